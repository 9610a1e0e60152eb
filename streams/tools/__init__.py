"""The command line and what it runs beside the worker: replay, bench, demo, the
simulator and the annotation-queue export."""
