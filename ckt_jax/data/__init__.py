"""Safety prompt data: readers for the asset packages, jailbreak templates, refusal replies,
text noise and the ckt_safety TFDS dataset."""
