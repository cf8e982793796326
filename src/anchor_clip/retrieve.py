"""`python -m anchor_clip.retrieve`: retrieve image-text anchors for the downstream classes from a pool.

See `anchor_clip.anchors.retrieve` for what the job does and writes.
"""

from anchor_clip.anchors.retrieve import main

if __name__ == "__main__":
    main()
