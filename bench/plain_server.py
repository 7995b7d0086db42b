"""The baseline a user would otherwise write: one uvicorn process, one FastAPI `async def` endpoint, the same model
and the same predict path, no batching. Run by bench/serve.py as a subprocess."""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel

from ray_app.model import TextClassifier
from ray_app.text import join_parts

torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
classifier = TextClassifier.load(os.environ["MODEL_DIR"])
app = FastAPI()


class Item(BaseModel):
    title: str
    description: str = ""


class Body(BaseModel):
    items: list[Item]


@app.post("/predict")
async def predict(body: Body) -> dict:
    probs = classifier.predict_proba([join_parts([i.title, i.description]) for i in body.items])
    labels = classifier.labels
    return {"predictions": [{"label": labels[int(p.argmax())]} for p in probs]}


@app.get("/ready")
async def ready() -> dict:
    return {"status": "ready"}
