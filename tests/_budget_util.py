"""A tiny architecture registered for budget measurements (one block per tower: every method's graph in a fraction
of a second)."""
import json


def tiny_spec(directory, arch: str, config: dict):
    """``budget.BackboneSpec`` of ``config`` registered with open_clip as ``arch`` (its JSON written to ``directory``),
    32 px images and a 16-token context."""
    import open_clip

    from fomo_ray.budgets.budget import BackboneSpec

    (directory / f"{arch}.json").write_text(json.dumps(config))
    open_clip.factory.add_model_config(directory)
    return BackboneSpec(arch, lambda: open_clip.create_model(arch, pretrained=None), 32, 16)
