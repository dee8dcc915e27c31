"""Full-access peers PEMA is measured against: LoRA, full fine-tuning, AdaMix, SLaSh, JR-WARP.

They tune the model itself (a model owner's in-house view), on the same (source, target) pairs,
prompt format and BLEU/chrF scoring as PEMA (../shared/METHODS.md, sections 2 and 3).
"""
