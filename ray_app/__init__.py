"""ray_app: prepare, train, evaluate and register a text classifier with Ray and MLflow."""

__version__ = "0.1.0"
