"""STATE / cell-load TOML splits: parsing, errors, and roles on a corpus."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vcc_dist.data.splits import SplitError, SplitSpec, has_role

# STATE's VCC starter.toml, verbatim apart from the path
STARTER = """
[datasets]
replogle_h1 = "/data/competition_support_set/{competition_train,k562_gwps,rpe1,jurkat,k562,hepg2}.h5"

[training]
replogle_h1 = "train"

[zeroshot]
"replogle_h1.hepg2" = "test"

[fewshot]
"""

FEWSHOT = """
[datasets]
replogle = "/data/replogle/"
other = "/data/other.h5ad"

[training]
replogle = "train"
other = "train"

[zeroshot]
"other.jurkat" = "val"

[fewshot]
[fewshot."replogle.rpe1"]
val = ["AARS", "BB"]
test = ["BB", "CC"]
"""


def test_parse_state_starter_toml():
    s = SplitSpec.loads(STARTER)
    assert s.datasets["replogle_h1"].endswith("hepg2}.h5")
    assert s.training == {"replogle_h1": "train"}
    assert s.zeroshot == {"replogle_h1.hepg2": "test"} and s.fewshot == {}
    # the brace glob matches each listed file
    assert s.store_datasets(["/data/competition_support_set/k562.h5"]) == ["replogle_h1"]
    again = SplitSpec.loads(s.to_toml())
    assert (again.datasets, again.training, again.zeroshot, again.fewshot) == \
        (s.datasets, s.training, s.zeroshot, s.fewshot)


def _groups():
    # stores: 0 = replogle (rpe1 + k562), 1 = other (jurkat)
    contexts = ["jurkat", "k562", "rpe1"]
    perts = ["non-targeting", "AARS", "BB", "CC", "DD"]
    rows = []
    for store, ctx in ((0, 1), (0, 2), (1, 0)):
        for p in range(len(perts)):
            rows.append((store, ctx, p))
    g = pd.DataFrame(rows, columns=["store", "context", "pert"])
    return g, contexts, perts


def test_roles_zeroshot_fewshot_and_controls():
    s = SplitSpec.loads(FEWSHOT)
    g, contexts, perts = _groups()
    sources = ["/data/replogle/a.h5ad", "/data/other.h5ad"]
    roles = s.group_roles(g, sources, contexts, perts, control_index=0)
    got = {(contexts[c], perts[p]): r for c, p, r in zip(g["context"], g["pert"], roles)}
    # controls are never held out
    assert all(got[(c, "non-targeting")] == "train" for c in contexts)
    # zeroshot context: every perturbation to its split
    assert [got[("jurkat", p)] for p in perts[1:]] == ["val"] * 4
    # fewshot: listed perturbations held out (BB in both lists), the rest train
    assert got[("rpe1", "AARS")] == "val" and got[("rpe1", "BB")] == "val,test"
    assert got[("rpe1", "CC")] == "test" and got[("rpe1", "DD")] == "train"
    assert all(got[("k562", p)] == "train" for p in perts)
    assert has_role("val,test", "test") and not has_role("train", "val")


def test_dataset_not_in_training_is_unused():
    text = FEWSHOT.replace('other = "train"\n', "").replace('"other.jurkat" = "val"', "")
    s = SplitSpec.loads(text)
    g, contexts, perts = _groups()
    roles = s.group_roles(g, ["/data/replogle/a.h5ad", "/data/other.h5ad"], contexts, perts, 0)
    assert set(roles[g["store"].to_numpy() == 1]) == {""}


@pytest.mark.parametrize("text,match", [
    ("[training]\nx = 'train'\n", r"\[datasets\] is missing"),
    ("[datasets]\na = '/x'\n[training]\nb = 'train'\n", "does not define"),
    ("[datasets]\na = '/x'\n[training]\na = 'test'\n", 'only value cell-load accepts is "train"'),
    ("[datasets]\na = '/x'\n[zeroshot]\n'a.k562' = 'holdout'\n", '"val", "test" or "train"'),
    ("[datasets]\na = '/x'\n[zeroshot]\nk562 = 'test'\n", "<dataset>.<context>"),
    ("[datasets]\na = '/x'\n[fewshot.'a.k562']\nvalidation = ['X']\n", "unknown keys"),
    ("[datasets]\na = '/x'\n[zeroshot]\n'a.k' = 'test'\n[fewshot.'a.k']\ntest = ['X']\n",
     "both zeroshot and fewshot"),
    ("[datasets]\na = '/x'\n[extra]\n", "unknown section"),
    ("[datasets\n", "not valid TOML"),
])
def test_bad_split_files(text, match):
    with pytest.raises(SplitError, match=match):
        SplitSpec.loads(text)


def test_unknown_context_is_an_error_and_missing_perts_warn():
    s = SplitSpec.loads(FEWSHOT.replace('"other.jurkat"', '"other.Jurkat"'))
    g, contexts, perts = _groups()
    with pytest.raises(SplitError, match="not in the corpus"):
        s.group_roles(g, ["/data/replogle/a.h5ad", "/data/other.h5ad"], contexts, perts, 0)
    s = SplitSpec.loads(FEWSHOT.replace('"CC"]', '"CC", "ZZZ"]'))
    with pytest.warns(UserWarning, match="ZZZ"):
        s.group_roles(g, ["/data/replogle/a.h5ad", "/data/other.h5ad"], contexts, perts, 0)


def test_no_store_in_any_dataset():
    s = SplitSpec.loads(FEWSHOT)
    g, contexts, perts = _groups()
    with pytest.raises(SplitError, match="no corpus store"):
        s.group_roles(g, ["/elsewhere/a.h5ad", "/elsewhere/b.h5ad"], contexts, perts, 0)


def test_simulator_split_file_parses(tiny_corpus):
    sim, _ = tiny_corpus
    s = SplitSpec.from_toml(sim.split_path)
    assert len(s.fewshot) == 1
    (key, entry), = s.fewshot.items()
    assert key.startswith("sim.") and entry["val"] and entry["test"]
    assert not set(entry["val"]) & set(entry["test"])
    assert np.all([isinstance(x, str) for x in entry["test"]])
