"""`python -m anchor_clip.caption`: caption the finetune images for ARF's caption anchors (see `anchors.caption`)."""

from anchor_clip.anchors.caption import main

if __name__ == "__main__":
    main()
