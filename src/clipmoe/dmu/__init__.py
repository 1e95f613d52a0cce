"""Diversified Multiplet Upcycling as a resumable pipeline: config, stage and baseline registries, the run
directory, embedding, clustering and the report."""
