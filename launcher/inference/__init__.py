"""Batch prediction with a stage's export (`launcher predict`): file formats (`files`, torch-free) and the
model side (`predictor`: one object per process or Ray Data actor, torch and transformers, no Ray)."""
