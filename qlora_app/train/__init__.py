"""The train stage: QLoRA fine-tuning of the 4-bit base into a run directory. The stage (stage), torchrun and
its ranks (launch, rank, distributed), the trainer's callbacks, tokens/s (throughput), the attention kernel
(attention) and what a finished run writes (outputs).
"""
