"""The shared clinical vocabulary: the mapping table, its conversions, and every loader's raw layout in it."""

from __future__ import annotations

import numpy as np
import pytest

from hymate.data import (
    EICU_STATIC,
    EICU_VARIABLES,
    MIMIC4_STATIC,
    MIMIC4_VARIABLES,
    PHYSIONET2012_STATIC,
    PHYSIONET2012_VARIABLES,
    PHYSIONET2019_STATIC,
    PHYSIONET2019_VARIABLES,
    SHARED_STATIC_NAMES,
    SHARED_VARIABLE_NAMES,
    DataError,
    concat_tables,
    load_dataset,
)
from hymate.data.vocabulary import (
    FAHRENHEIT_TO_CELSIUS,
    SHARED_STATIC,
    SHARED_VARIABLES,
    SOURCES,
    Conversion,
    markdown_table,
)
from tests.test_data_eicu import write_eicu
from tests.test_data_mimic4 import write_mimic4
from tests.test_data_physionet2012 import write_p12
from tests.test_data_physionet2019 import write_p19

NATIVE = {
    "physionet2012": (PHYSIONET2012_VARIABLES, PHYSIONET2012_STATIC),
    "physionet2019": (PHYSIONET2019_VARIABLES, PHYSIONET2019_STATIC),
    "eicu": (EICU_VARIABLES, EICU_STATIC),
    "mimic4": (MIMIC4_VARIABLES, MIMIC4_STATIC),
}


def shared(name: str) -> int:
    return SHARED_VARIABLE_NAMES.index(name) + 1


def load_shared(source: str, root):
    options = {"physionet2019": {"observation_hours": 10}, "physionet2012": {"sets": ("a",)}}.get(source, {})
    return load_dataset(source, root, cache_dir=None, vocabulary="shared", **options)


@pytest.mark.parametrize("source", SOURCES)
def test_every_name_of_every_loader_has_exactly_one_canonical_entry(source):
    variables, static = NATIVE[source]
    for names, entries in ((variables, SHARED_VARIABLES), (static, SHARED_STATIC)):
        covered = [t.name for e in entries for t in e.terms if t.source == source]
        assert sorted(covered) == sorted(names), source  # each native name once, none invented
    assert len(set(SHARED_VARIABLE_NAMES)) == len(SHARED_VARIABLE_NAMES)
    assert len(set(SHARED_STATIC_NAMES)) == len(SHARED_STATIC_NAMES)


def test_source_specific_variables_are_kept_and_marked():
    entry = {v.name: v for v in SHARED_VARIABLES}
    assert entry["MechVent"].source_specific and entry["MechVent"].sources == ("physionet2012",)
    assert entry["EtCO2"].source_specific and entry["EtCO2"].sources == ("physionet2019",)
    assert not entry["HR"].source_specific and set(entry["HR"].sources) == set(SOURCES)
    # one canonical pressure whatever the method, so PhysioNet 2019's SBP meets the others'
    sbp = {(t.source, t.name) for t in entry["SBP"].terms}
    assert {("physionet2012", "SysABP"), ("physionet2012", "NISysABP"), ("physionet2019", "SBP")} <= sbp
    assert {v.name for v in SHARED_STATIC if v.source_specific} == {"ICUType", "Unit"}


def test_conversions_are_affine_and_fahrenheit_is_one_of_them():
    np.testing.assert_allclose(FAHRENHEIT_TO_CELSIUS.apply(np.array([32.0, 98.6, 212.0])), [0.0, 37.0, 100.0])
    lactate_mg_dl = Conversion(1 / 9.008, 0.0, "mg/dL -> mmol/L")  # the form a source in other units gets
    np.testing.assert_allclose(lactate_mg_dl.apply(np.array([18.016])), [2.0])
    assert Conversion().is_identity and not FAHRENHEIT_TO_CELSIUS.is_identity


def test_physionet2012_raw_layout_in_the_shared_vocabulary(tmp_path):
    source = load_dataset("physionet2012", write_p12(tmp_path), cache_dir=None, sets=("a",))
    table = load_shared("physionet2012", tmp_path)
    assert table.variables == SHARED_VARIABLE_NAMES and table.static_names == SHARED_STATIC_NAMES
    np.testing.assert_array_equal(table.offsets, source.offsets)
    np.testing.assert_array_equal(table.times, source.times)
    np.testing.assert_array_equal(table.values, source.values)  # PhysioNet 2012 is in the canonical units
    names = [table.variables[i - 1] for i in table.events(0)[1]]
    assert names == ["GCS", "HR", "HR", "Weight", "pH"]
    assert [table.variables[i - 1] for i in table.events(2)[1]] == ["DBP", "Weight", "Temp"]  # DiasABP -> DBP
    static = dict(zip(table.static_names, table.static[0], strict=True))
    assert (static["Age"], static["Gender"], static["ICUType"], static["Weight"]) == (54, 0, 4, 80.5)
    assert np.isnan(static["HospAdmTime"]) and np.isnan(static["Unit"])


def test_physionet2019_raw_layout_in_the_shared_vocabulary(tmp_path):
    table = load_shared("physionet2019", write_p19(tmp_path))
    times, ids, values = table.events(0)
    assert [table.variables[i - 1] for i in ids] == ["HR", "SpO2", "HR", "Lactate"]  # O2Sat -> SpO2
    np.testing.assert_allclose(values, [80, 97, 82.5, 1.4], rtol=1e-6)
    static = dict(zip(table.static_names, table.static[1], strict=True))
    assert (static["Age"], static["Gender"], static["Unit"], static["HospAdmTime"]) == (50, 0, 2, -2.5)
    assert np.isnan(static["Height"]) and np.isnan(static["ICUType"])


def test_eicu_raw_layout_in_the_shared_vocabulary(tmp_path):
    source = load_dataset("eicu", write_eicu(tmp_path), cache_dir=None)
    table = load_shared("eicu", tmp_path)
    native = [source.variables[i - 1] for i in source.events(0)[1]]
    mapped = [table.variables[i - 1] for i in table.events(0)[1]]
    assert "NISysABP" in native and "SysABP" in native
    assert mapped == [
        {"NISysABP": "SBP", "NIDiasABP": "DBP", "NIMAP": "MAP", "SysABP": "SBP"}.get(n, n) for n in native
    ]
    np.testing.assert_array_equal(table.values, source.values)
    column = {n: i for i, n in enumerate(table.static_names)}
    np.testing.assert_allclose(table.static[:, column["Height"]], source.static[:, 2])
    np.testing.assert_allclose(table.static[:, column["HospAdmTime"]], source.static[:, 4])


def test_mimic4_raw_layout_converts_fahrenheit_and_meets_the_others(tmp_path):
    table = load_shared("mimic4", write_mimic4(tmp_path))
    times, ids, values = table.events(0)
    assert [table.variables[i - 1] for i in ids] == ["HR", "SBP", "Temp", "Creatinine", "Lactate", "HR"]
    np.testing.assert_allclose(values, [88, 120, 37.0, 1.2, 2.1, 100], rtol=1e-5)  # item 223761: 98.6 °F
    assert list(table.static_names) == list(SHARED_STATIC_NAMES)
    assert np.isnan(table.static[:, 2:]).all()  # MIMIC-IV has only Age and Gender


def test_tables_of_every_source_concatenate_in_the_shared_vocabulary(tmp_path):
    roots = {
        "physionet2012": write_p12(tmp_path / "p12"),
        "physionet2019": write_p19(tmp_path / "p19"),
        "eicu": write_eicu(tmp_path / "eicu"),
        "mimic4": write_mimic4(tmp_path / "mimic4"),
    }
    tables = [load_shared(source, root) for source, root in roots.items()]
    pooled = concat_tables(tables, name="four-sources")
    assert len(pooled) == sum(len(t) for t in tables)
    hr = pooled.variable_ids == shared("HR")
    assert hr.sum() == sum((t.variable_ids == shared("HR")).sum() for t in tables) > 4
    with pytest.raises(DataError, match="different schemas"):
        concat_tables([load_dataset("physionet2012", roots["physionet2012"], cache_dir=None, sets=("a",)), tables[1]])


def test_unknown_vocabulary_and_a_source_without_entries_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown vocabulary 'snomed'; valid: source, shared"):
        load_dataset("synthetic", vocabulary="snomed", stays_per_site=20)
    with pytest.raises(DataError, match="synthetic has no entry in the shared vocabulary"):
        load_dataset("synthetic", vocabulary="shared", stays_per_site=20)


def test_the_readme_shows_the_mapping_table_as_the_code_has_it():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme


def test_gradient_boosting_fits_a_table_with_variables_its_source_never_records(tmp_path):
    from hymate.baseline import fit_baseline

    table = load_shared("physionet2012", write_p12(tmp_path))  # no SpO2, Cl, ... in PhysioNet 2012
    grid = {"max_iter": (20,), "early_stopping": (False,)}  # one small fit: the point is that it fits at all
    probs = fit_baseline("gradient-boosting", table, grid=grid).predict(table)
    assert probs.shape == (len(table),) and np.isfinite(probs).all()
