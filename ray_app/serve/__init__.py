"""Ray Serve app: `build_app` (in `app.py`) is what serve_config.yaml deploys."""
