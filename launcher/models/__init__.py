"""Networks: Hugging Face configs built from a stage's `model` section (sizes or a named preset), runtime
switches (activation checkpointing, attention kernel) and parameter counting. Imports torch and transformers;
the job spec (`launcher.jobspec`) stays free of both."""
