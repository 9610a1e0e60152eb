"""acsr-metrics: real-time KPIs for autonomous customer-support AI agents."""

__version__ = "0.1.0"
