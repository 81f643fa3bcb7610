"""The save directory of one training run: which checkpoint a resume continues from."""
from trm.checkpoint import CheckpointError, list_checkpoints, load_checkpoint


def find_checkpoint(save_dir, resume, log):
    """(checkpoint dict, path) for --resume: 'auto' takes the newest readable checkpoint in save_dir (a damaged one is
    reported and skipped) and gives (None, None) when there is none; a path must load (CheckpointError otherwise)."""
    if resume != "auto":
        return load_checkpoint(resume, map_location="cpu"), resume
    for path in list_checkpoints(save_dir):
        try:
            return load_checkpoint(path, map_location="cpu"), path
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    return None, None
