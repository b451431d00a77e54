"""The 63 datasets of FoMo-in-Flux (FiF) as the authors ship them: name, role, task, primer template, splits.

Source: Roth, Udandarao et al., "A Practitioner's Guide to Continual Multimodal Pretraining" (arXiv 2408.14471) and
the facts collected in ``../shared/FIF_LAYOUT.md`` from the authors' code (``data_lib/<handle>.py``,
``download_data.csv``, ``configs/experiment/continualfomo_default.yaml``). One entry per downloaded folder:

- ``name``: folder name == tar name == stream token (case-sensitive, e.g. ``FGVCAircraft``);
- ``handle``: the authors' module name (``data_lib/<handle>.py``); stream files may use it instead of ``name``;
- ``role``: ``adapt`` (one of the 41 datasets the stream is built from; train + test converted) or ``eval``
  (one of the 22 evaluation-only datasets; only the test split is converted, as FiF evaluates only that);
- ``task``: ``retrieval`` for MSCOCO, FLICKR30K and FSCOCO, else ``classification``;
- ``splits``: the split names of the info files ``00_info/<NAME>_<split>.json`` as (train, test) or (test,);
- ``resized``: the module sets ``create_resized_variant_if_possible`` (a ``<NAME>_<split>_224`` tree may exist);
- ``year``: first public release of the dataset (paper or preprint). This is our own lookup, not the authors' list:
  it drives the default time-incremental order; pass an explicit release-order file to reproduce theirs.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

ADAPT, EVAL = "adapt", "eval"
CLS, RET = "classification", "retrieval"
TRAIN_TEST = ("train", "test")
TEST_ONLY = ("test",)


@dataclass(frozen=True)
class FifDataset:
    """One downloaded FiF dataset (see the module docstring for the fields)."""

    name: str
    handle: str
    role: Literal["adapt", "eval"]
    task: Literal["classification", "retrieval"]
    template: str
    splits: tuple[str, ...]
    resized: bool
    year: int
    num_classes: int = 0  # 0 = no class list (FLICKR30K, MSCOCO)
    key_pattern: str = ""  # where images live under <root>/<NAME>/ (documentation and error hints only)
    classnames_from: str = ""  # IMAGENET_V2 reuses IMAGENET's list, sorted case-insensitively (authors' module)

    @property
    def train_split(self) -> str | None:
        """Info-file split name used as our ``train`` split (None for test-only datasets)."""
        return self.splits[0] if len(self.splits) == 2 else None

    @property
    def test_split(self) -> str:
        """Info-file split name used as our ``test`` split (``val`` for iNATURALIST2021 and MTSD)."""
        return self.splits[-1]

    def converted_splits(self) -> dict[str, str]:
        """``{our split: info split}``: adaptation datasets give train and test, evaluation-only ones test only."""
        out = {"train": self.train_split} if self.role == ADAPT and self.train_split else {}
        out["test"] = self.test_split
        return out


def _d(name, handle, role, task, ncls, splits, resized, year, pattern, template, **kw) -> FifDataset:
    return FifDataset(name=name, handle=handle, role=role, task=task, template=template, splits=splits,
                      resized=resized, year=year, num_classes=ncls, key_pattern=pattern, **kw)


# fmt: off
_ENTRIES = [
    _d("AI2DIAGRAMS", "ai2diagrams", ADAPT, CLS, 15, TRAIN_TEST, True, 2016, "ai2d/images/<n>.png", "A photo of a {}."),
    _d("ARTBENCH10", "artbench10", ADAPT, CLS, 1870, TRAIN_TEST, False, 2022, "artbench-10-imagefolder-split/<split>/<style>/<file>", "A painting of the artist {}."),
    _d("BIRDSNAP", "birdsnap", ADAPT, CLS, 500, TRAIN_TEST, True, 2014, "birdsnap/download/images/<Species>/<id>.jpg", "A photo of the bird {}."),
    _d("CALTECH101", "caltech101", EVAL, CLS, 101, TRAIN_TEST, True, 2004, "caltech101/101_ObjectCategories/<cls>/image_NNNN.jpg", "A photo of a {}."),
    _d("CALTECH256", "caltech256", EVAL, CLS, 257, TRAIN_TEST, True, 2007, "caltech256/256_ObjectCategories/<NNN.cls>/NNN_NNNN.jpg", "A photo of a {}."),
    _d("CARS196", "cars196", EVAL, CLS, 196, TRAIN_TEST, True, 2013, "stanford_cars/cars_<split>/NNNNN.jpg", "A photo of a {}, a type of car."),
    _d("CIFAR10", "cifar10", EVAL, CLS, 10, TRAIN_TEST, False, 2009, "cifar-10-images-<split>/<i>.png", "A photo of a {}."),
    _d("CIFAR100", "cifar100", ADAPT, CLS, 100, TRAIN_TEST, False, 2009, "cifar-100-images-<split>/<i>.png", "A photo of a {}."),
    _d("CLEVR", "clevr", ADAPT, CLS, 247, TRAIN_TEST, True, 2016, "CLEVR_v1.0/images/<train,val>/<file>.png", "A photo of synthetic shapes, with {}."),
    _d("CLRS", "clrs", ADAPT, CLS, 25, TRAIN_TEST, False, 2020, "CLRS/CLRS/<cls>/<file>.jpg", "A satellite image of a {}."),
    _d("COUNTRY211", "country211", ADAPT, CLS, 211, TRAIN_TEST, True, 2021, "country211/<split>/<CC>/<file>.jpg", "A photo representing the country of {}."),
    _d("CUB200", "cub200", ADAPT, CLS, 200, TRAIN_TEST, False, 2011, "cub-200-images-<split>/<i>.png", "A photo of a {}, a type of bird."),
    _d("DF20MINI", "df20mini", ADAPT, CLS, 179, TRAIN_TEST, True, 2021, "<split>/<Genus species>/<id>.JPG", "A photo of the fungi {}."),
    _d("DOLLARSTREET", "dollarstreet", ADAPT, CLS, 1701, TRAIN_TEST, True, 2022, "dataset_dollarstreet/assets/<id>/<id>.jpg", "A photo of a {}."),
    _d("DOMAINNET_CLIPART", "domainnet_clipart", ADAPT, CLS, 345, TRAIN_TEST, True, 2019, "clipart/<cls>/<file>.jpg", "A clipart of a {}."),
    _d("DOMAINNET_INFOGRAPH", "domainnet_infograph", ADAPT, CLS, 345, TRAIN_TEST, True, 2019, "infograph/<cls>/<file>.jpg", "An infograph of a {}."),
    _d("DOMAINNET_PAINTING", "domainnet_painting", ADAPT, CLS, 344, TRAIN_TEST, True, 2019, "painting/<cls>/<file>.jpg", "A painting of a {}."),
    _d("DOMAINNET_QUICKDRAW", "domainnet_quickdraw", EVAL, CLS, 345, TRAIN_TEST, True, 2019, "quickdraw/<cls>/<file>.png", "A quickdraw of a {}."),
    _d("DOMAINNET_SKETCH", "domainnet_sketch", ADAPT, CLS, 345, TRAIN_TEST, True, 2019, "sketch/<cls>/<file>.jpg", "A sketch of a {}."),
    _d("DSPRITES", "dsprites", ADAPT, CLS, 27, TRAIN_TEST, False, 2017, "dsprites-images-<split>/<idx>.png", "A black-and-white photo of a {}."),
    _d("DTD", "dtd", ADAPT, CLS, 47, TRAIN_TEST, False, 2014, "dtd/dtd/images/<cls>/<cls>_NNNN.jpg", "A photo of a {} texture."),
    _d("EuroSAT", "eurosat", EVAL, CLS, 10, TRAIN_TEST, False, 2017, "eurosat/2750/<Cls>/<Cls>_<n>.jpg", "A centered satellite photo of a {}."),
    _d("FashionMNIST", "fashionmnist", EVAL, CLS, 10, TRAIN_TEST, False, 2017, "fashionmnist-images-<split>/<target>-<i>.png", "A black-and-white photo of a {}, a type of clothing."),
    _d("FGVCAircraft", "fgvcaircraft", ADAPT, CLS, 100, TRAIN_TEST, True, 2013, "fgvc-aircraft-2013b/data/images/<id>.jpg", "A photo of a {}, a type of aircraft."),
    _d("FLICKR30K", "flickr30k", EVAL, RET, 0, TEST_ONLY, False, 2014, "flickr30k-images/<id>.jpg", "{}"),
    _d("FLOWERS102", "flowers102", ADAPT, CLS, 102, TRAIN_TEST, False, 2008, "flowers-102/jpg/image_NNNNN.jpg", "A photo of a {}, a type of flower."),
    _d("Food101", "food101", EVAL, CLS, 101, TRAIN_TEST, True, 2014, "food-101/images/<cls>/<id>.jpg", "A photo of a {}, a type of food."),
    _d("FRU92", "fru92", ADAPT, CLS, 92, TRAIN_TEST, True, 2017, "processed/fru92_images/<cls>/<file>", "A photo of a {}, a type of fruit."),
    _d("FSCOCO", "fscoco", ADAPT, RET, 115, TRAIN_TEST, False, 2022, "fscoco/raster_sketches/<k>/<cocoid>.jpg", "A sketch of a {}"),
    _d("GTSRB", "gtsrb", EVAL, CLS, 43, TRAIN_TEST, False, 2011, "GTSRB/Training/<000NN>/<file>.ppm", 'A centered photo of a "{}" traffic sign.'),
    _d("IMAGENET", "imagenet", EVAL, CLS, 1000, TEST_ONLY, True, 2009, "val/<wnid>/<file>.JPEG", "A photo of a {}."),
    _d("IMAGENET_A", "imagenet_a", EVAL, CLS, 200, TEST_ONLY, True, 2019, "imagenet-a/<wnid>/<file>.jpg", "A photo of a {}."),
    _d("IMAGENET_D", "imagenet_d", EVAL, CLS, 103, TEST_ONLY, True, 2024, "ImageNet-D/merged/<cls>/<file>.png", "A photo of a {}."),
    _d("IMAGENET_R", "imagenet_r", EVAL, CLS, 200, TEST_ONLY, True, 2020, "imagenet-r/<wnid>/<file>", "A photo of a {}."),
    _d("IMAGENET_S", "imagenet_s", EVAL, CLS, 1000, TEST_ONLY, True, 2019, "sketch/<wnid>/<file>", "A photo of a {}."),
    _d("IMAGENET_V2", "imagenet_v2", EVAL, CLS, 1000, TEST_ONLY, True, 2019, "test/<cls>/<file>", "A photo of a {}.", classnames_from="IMAGENET"),
    _d("iNATURALIST2021", "inaturalist2021", ADAPT, CLS, 2500, ("train_mini", "val"), True, 2021, "<train_mini,val>/<NNNNN_taxon_path>/<file>.jpg", "A photo of a {}."),
    _d("ISICMELANOMA", "isicmelanoma", ADAPT, CLS, 7, TRAIN_TEST, True, 2018, "train/ISIC_NNNNNNN.jpg", "A close-up photo of human skin with a mole exhibiting {}."),
    _d("MITSTATES", "mitstates", ADAPT, CLS, 1962, TRAIN_TEST, False, 2015, "data/images/<adj noun>/<file>", "A photo of a {}."),
    _d("MNIST", "mnist", EVAL, CLS, 10, TRAIN_TEST, False, 1998, "mnist-images-<split>/<target>-<i>.png", 'A black-and-white photo of the number: "{}".'),
    _d("MONKEYS10", "monkeys10", EVAL, CLS, 10, TRAIN_TEST, True, 2018, "monkeys10/<training/training,validation/validation>/n<k>/<file>.jpg", "A photo of a {}, a type of monkey."),
    _d("MSCOCO", "mscoco", EVAL, RET, 0, TEST_ONLY, True, 2014, "images_mscoco_2014_5k_test/COCO_val2014_<12d>.jpg", "{}"),
    _d("MTSD", "mtsd", ADAPT, CLS, 227, ("train", "val"), False, 2019, "MTSD/processed/<train,val>/<cls>/<file>", 'A centered photo of a "{}" traffic sign.'),
    _d("MVTECAD_Adapt", "mvtecad_adapt", ADAPT, CLS, 15, TRAIN_TEST, True, 2019, "data/<object>/<n>.png", "A close-up photo of a {}."),
    _d("MVTECAD_Eval", "mvtecad_eval", ADAPT, CLS, 88, TRAIN_TEST, True, 2019, "data/<object>-<defect>/<nnn>.png", "A close-up photo of a {}."),
    _d("OBJECTNET", "objectnet", ADAPT, CLS, 313, TRAIN_TEST, True, 2019, "datasets/objectnet-1.0-beta/<folder>/<file>", "A photo of a {}."),
    _d("OBSC_ANIMALS", "obsc_animals", ADAPT, CLS, 74, TRAIN_TEST, False, 2024, "<cls>/<generator>_<i>_<j>.JPEG", "A photo of the obscure animal {}."),
    _d("OBSC_THINGS", "obsc_things", ADAPT, CLS, 84, TRAIN_TEST, False, 2024, "<cls>/<generator>_<i>_<j>.JPEG", "A photo of the obscure thing {}."),
    _d("OPENIMAGES", "openimages", ADAPT, CLS, 589, TRAIN_TEST, True, 2016, "images/...", "A photo of a {}."),
    _d("OXFORDPETS", "oxford_pets", EVAL, CLS, 37, TRAIN_TEST, False, 2012, "oxford-iiit-pet/images/<Breed>_<n>.jpg", "A photo of a {}, a type of pet."),
    _d("PATTERNNET", "patternnet", ADAPT, CLS, 38, TRAIN_TEST, False, 2017, "PatternNet/images/<cls>/<file>.jpg", "A satellite image of a {}."),
    _d("PLACES365", "places365", ADAPT, CLS, 365, TRAIN_TEST, False, 2016, "PLACES365_subset_train/<cls>/<f> (train), val/<f> (test)", "A photo of a {}."),
    _d("PLANTVILLAGE", "plantvillage", ADAPT, CLS, 38, TRAIN_TEST, False, 2015, "<cls>/<file>", "A close-up photo of a {}."),
    _d("QUILT", "quilt", ADAPT, CLS, 157, TRAIN_TEST, True, 2023, "quilt1m_data/<file>", "A histopathology photo depicting {} pathologies."),
    _d("RESISC45", "resisc45", ADAPT, CLS, 45, TRAIN_TEST, False, 2017, "NWPU-RESISC45/<cls>/<cls>_NNN.jpg", "A satellite image of {}."),
    _d("SHAPES3D", "shapes3d", ADAPT, CLS, 864, TRAIN_TEST, False, 2018, "shapes3d-images-<split>/<idx>.png", "A photo of a synthetic {}."),
    _d("SNAKECLEF", "snake_clef", ADAPT, CLS, 1599, TRAIN_TEST, True, 2023, "SnakeCLEF2023-medium_size/<image_path>", "A photo of a {} snake."),
    _d("STL10", "stl10", EVAL, CLS, 10, TRAIN_TEST, False, 2011, "stl10-images-<split>/<target>-<i>.png", "A photo of a {}."),
    _d("SUN397", "sun397", ADAPT, CLS, 397, TRAIN_TEST, True, 2010, "<split>/<cls>/<file>", "A photo of a {}."),
    _d("SVHN", "svhn", EVAL, CLS, 10, TRAIN_TEST, False, 2011, "svhn-images-<split>/<target>-<i>.png", 'A photo of the number: "{}".'),
    _d("SynthCLIP106", "synthclip106", ADAPT, CLS, 106, TRAIN_TEST, False, 2024, "images/<cls>/...", "A photo of a {}."),
    _d("VEG200", "veg200", ADAPT, CLS, 200, TRAIN_TEST, True, 2017, "processed/veg200_images/<cls>/<file>", "A photo of a {}, a type of vegetable."),
    _d("ZAPPOS50k", "zappos50k", ADAPT, CLS, 1847, TRAIN_TEST, False, 2014, "data/<cls>/<file>", "A photo of {} shoes."),
]
# fmt: on

CATALOGUE: dict[str, FifDataset] = {d.name: d for d in _ENTRIES}
ADAPT_NAMES: tuple[str, ...] = tuple(d.name for d in _ENTRIES if d.role == ADAPT)
EVAL_NAMES: tuple[str, ...] = tuple(d.name for d in _ENTRIES if d.role == EVAL)

# Stream tokens other than the download NAME that the authors' stream loader accepts (utils/sequence_handling.py):
# every module handle, plus three all-caps spellings of the mixed-case names.
ALIASES: dict[str, str] = {d.handle: d.name for d in _ENTRIES}
ALIASES.update({"EUROSAT": "EuroSAT", "FGVCAIRCRAFT": "FGVCAircraft", "FOOD101": "Food101"})


class CatalogueError(KeyError):
    """A dataset token is not one of the 63 FiF datasets; ``str()`` names it and the closest valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def resolve(token: str) -> str:
    """Download NAME of a dataset token (a NAME, a module handle or an alias), or a clear CatalogueError."""
    if token in CATALOGUE:
        return token
    if token in ALIASES:
        return ALIASES[token]
    close = difflib.get_close_matches(token, list(CATALOGUE) + list(ALIASES), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise CatalogueError(f"'{token}' is not a FiF dataset name or handle.{hint}")


def release_order(names: list[str] | tuple[str, ...] = ADAPT_NAMES) -> list[str]:
    """Datasets by release year; equal years keep catalogue (alphabetical) order so the result is deterministic."""
    return sorted(names, key=lambda n: (CATALOGUE[resolve(n)].year, list(CATALOGUE).index(resolve(n))))


assert len(CATALOGUE) == 63 and len(ADAPT_NAMES) == 41 and len(EVAL_NAMES) == 22, "FiF has 41 + 22 datasets"
