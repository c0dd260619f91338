"""Zero-shot evaluation: prompt-ensemble classifiers, accuracy tables, base vs customized."""
