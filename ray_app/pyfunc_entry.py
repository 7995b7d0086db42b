"""The file MLflow logs as a version's model code ("models from code"): loading the version runs this file, which
names the PythonModel, instead of unpickling an object with CloudPickle. Not imported by the package itself."""

from mlflow.models import set_model

from ray_app.pyfunc import ClassifierModel

set_model(ClassifierModel())
