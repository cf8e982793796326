"""`python -m anchor_clip.demo`: ARF and its baselines on the embedded miniature world (offline)."""

from anchor_clip.world.demo import main

if __name__ == "__main__":
    main()
