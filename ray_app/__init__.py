"""ray_app: prepare, train, evaluate and register a text classifier with Ray and MLflow."""

from pathlib import Path

__version__ = "0.1.0"

# Ray Data's logging with its console at WARNING (the full log stays in the session's ray-data.log): every process
# of a head that `ray_app.local` starts, and every `ray-app` driver, gets it unless RAY_DATA_LOGGING_CONFIG is set.
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
