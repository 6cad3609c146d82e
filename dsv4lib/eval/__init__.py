"""Evaluation: MMLU letter-logit scoring (:mod:`.mmlu`) and perplexity / KL / top-1 agreement
between two models (:mod:`.perplexity`)."""
