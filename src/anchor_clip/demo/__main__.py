"""`python -m anchor_clip.demo`: ARF and its baselines on the embedded miniature world (offline)."""

from anchor_clip.demo.run import main

main()
