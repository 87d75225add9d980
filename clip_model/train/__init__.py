"""Training, fine-tuning and evaluation of CLIP models (``clip-train``). Nothing else in the project imports this
package: it uses ``clip_model``'s public API and the loss in ``clip_model.loss``."""
