import pytest


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory):
    """A random checkpoint with the tiny preset's shapes, f32 on disk."""
    import gemma2_ref as g2
    from gemma2_ref.checkpoints import random_weights, save_checkpoint
    from gemma2_ref.data import bundled_path

    cfg = g2.PRESETS["tiny"]
    d = tmp_path_factory.mktemp("tiny_random")
    return save_checkpoint(
        d, cfg, random_weights(cfg, seed=7, scale=2.0), "F32", tokenizer=bundled_path("tiny") / "tokenizer.model"
    )
