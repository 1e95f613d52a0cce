"""Evaluation suite: zero-shot retrieval and classification (as CLIP_benchmark defines them), MMVP-VLM,
attribute probes and routing analysis, for any model ``clipmoe.load`` opens. Numbers are percentages."""

from .attributes import attribute_state, read_attributes
from .classification import classification_metrics, evaluate_classification, zero_shot_classifier
from .datasets import (
    ClassificationDataset,
    ImageRef,
    RetrievalDataset,
    load_coco_captions,
    load_flickr_captions,
    load_image_folder,
    load_wds,
    open_eval_set,
)
from .features import encode_images, encode_texts, topk_similarity
from .mmvp import MMVPPair, evaluate_mmvp, load_mmvp
from .probes import Probe, evaluate_probes, load_probes
from .retrieval import evaluate_retrieval, retrieval_metrics
from .routing import RoutingCollector, analyze_routing, plot_routing
from .suite import evaluate_suite, find_eval_sets

__all__ = [
    "ClassificationDataset",
    "ImageRef",
    "MMVPPair",
    "Probe",
    "RetrievalDataset",
    "RoutingCollector",
    "analyze_routing",
    "attribute_state",
    "classification_metrics",
    "encode_images",
    "encode_texts",
    "evaluate_classification",
    "evaluate_mmvp",
    "evaluate_probes",
    "evaluate_retrieval",
    "evaluate_suite",
    "find_eval_sets",
    "load_coco_captions",
    "load_flickr_captions",
    "load_image_folder",
    "load_mmvp",
    "load_probes",
    "load_wds",
    "open_eval_set",
    "plot_routing",
    "read_attributes",
    "retrieval_metrics",
    "topk_similarity",
    "zero_shot_classifier",
]
