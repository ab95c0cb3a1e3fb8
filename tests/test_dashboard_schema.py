"""The dashboard against Grafana's own typed models (grafana-foundation-sdk, generated from Grafana's schemas): every
panel reads into the SDK's model for its panel type, every query into the Prometheus query model, every field holds
the type its model declares, and a panel has no field its model does not know.

The SDK's ``from_json`` copies values as they come and drops the fields it does not know, so the strictness is here:
:func:`type_errors` checks each value of the decoded models against the type its model declares, and each panel,
written back with the SDK's encoder, must still carry every field of the dashboard's panel with its value. A wrong
type is reported by the SDK's attribute name (``grid_pos.h``), a field the SDK does not know by its JSON name."""

from __future__ import annotations

import copy
import enum
import json
import sys
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prom_helpers import load_dashboard

if sys.version_info < (3, 11):
    pytest.skip("grafana-foundation-sdk needs Python 3.11 or later", allow_module_level=True)

from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as sdk_dashboard
from grafana_foundation_sdk.models import prometheus as sdk_prometheus

# The SDK picks a panel's options and field config models by the panel's type, and its queries' model by its data
# source's type, among the ones registered here.
plugins.register_default_plugins()

#: What the SDK's decoders raise on a value of the wrong shape (a string where an object belongs).
DECODE_ERRORS = (TypeError, KeyError, AttributeError, ValueError)


def is_model_class(hint: Any) -> bool:
    return isinstance(hint, type) and callable(getattr(hint, "from_json", None))


def type_errors(value: Any, hint: Any, where: str) -> Iterator[str]:
    """Where ``value`` is not of the type ``hint`` the SDK declares for it, down through the models it holds."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        # An untyped field (a panel's options, a field config's custom part) holds the model its panel type's
        # plugin decoded it into, or the raw JSON.
        if is_model_class(type(value)):
            yield from model_errors(value, where)
    elif origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        errors = [list(type_errors(value, arg, where)) for arg in args if arg is not type(None)]
        if all(errors):
            yield from min(errors, key=len)
    elif origin is typing.Literal:
        if value not in args:
            yield f"{where}: {value!r} is none of {list(args)}"
    elif origin is list:
        if not isinstance(value, list):
            yield f"{where}: {value!r} is not a list"
            return
        for index, item in enumerate(value):
            yield from type_errors(item, args[0], f"{where}[{index}]")
    elif origin is dict:
        if not isinstance(value, dict):
            yield f"{where}: {value!r} is not an object"
            return
        for key, item in value.items():
            yield from type_errors(key, args[0], f"{where} key")
            yield from type_errors(item, args[1], f"{where}.{key}")
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        # The decoders keep an enum field's raw value.
        allowed = [member.value for member in hint]
        if isinstance(value, bool) or value not in allowed:
            yield f"{where}: {value!r} is none of {allowed}"
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            yield f"{where}: {value!r} is not a number"
    elif hint in (int, str, bool):
        if isinstance(value, bool) is not (hint is bool) or not isinstance(value, hint):
            yield f"{where}: {value!r} is not {hint.__name__}"
    elif is_model_class(hint) and isinstance(value, dict):
        # Some decoders keep the raw JSON of a typed field (a panel's transformations).
        try:
            decoded = hint.from_json(value)
        except DECODE_ERRORS as error:
            yield f"{where}: {hint.__name__} cannot read {value!r} ({type(error).__name__}: {error})"
            return
        yield from model_errors(decoded, where)
    elif not isinstance(value, hint):
        yield f"{where}: {value!r} is not {hint.__name__}"
    elif is_model_class(type(value)):
        yield from model_errors(value, where)


def model_errors(model: Any, where: str, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """Every field of an SDK model against the type its class declares for it."""
    for name, hint in typing.get_type_hints(type(model)).items():
        if name not in skip:
            yield from type_errors(getattr(model, name), hint, f"{where}.{name}")


def lost_fields(written: Any, read_back: Any, where: str) -> Iterator[str]:
    """Fields of ``written`` that ``read_back`` lacks or holds another value in (``read_back`` may add defaults)."""
    if isinstance(written, dict) and isinstance(read_back, dict):
        for key, value in written.items():
            if key not in read_back:
                yield f"{where}.{key}: the SDK's model has no such field"
            else:
                yield from lost_fields(value, read_back[key], f"{where}.{key}")
    elif isinstance(written, list) and isinstance(read_back, list) and len(written) == len(read_back):
        for index, (item, back) in enumerate(zip(written, read_back)):
            yield from lost_fields(item, back, f"{where}[{index}]")
    elif written != read_back or type(written) is not type(read_back):
        yield f"{where}: {written!r} comes back from the SDK's model as {read_back!r}"


def panel_errors(panel: dict[str, Any]) -> list[str]:
    """What is wrong with one panel of the dashboard JSON by the SDK's models, each line naming the panel."""
    name = f"panel {panel.get('title')!r} ({panel.get('type')})"
    model = sdk_dashboard.RowPanel if panel.get("type") == "row" else sdk_dashboard.Panel
    try:
        decoded = model.from_json(panel)
    except DECODE_ERRORS as error:
        return [f"{name}: the SDK's {model.__name__} cannot read it ({type(error).__name__}: {error})"]
    errors = list(model_errors(decoded, name))
    if model is sdk_dashboard.Panel:
        config = cogruntime.panelcfg_config(decoded.type_val)
        if config is None or config.options_from_json_hook is None:
            errors.append(f"{name}: the SDK has no model for panel type {decoded.type_val!r}")
        for index, query in enumerate(decoded.targets or []):
            if not isinstance(query, sdk_prometheus.Dataquery):
                kind = f"{type(query).__module__.rsplit('.', 1)[-1]}.{type(query).__name__}"
                errors.append(f"{name}.targets[{index}]: read as {kind}, not as a Prometheus query")
    read_back = json.loads(json.dumps(decoded, cls=JSONEncoder))
    errors += lost_fields(panel, read_back, name)
    return errors


@pytest.fixture(scope="module")
def dashboard():
    return load_dashboard()


def panel_named(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    return next(panel for panel in dashboard["panels"] if panel["title"] == title)


def test_every_panel_and_query_reads_into_the_sdk_models(dashboard):
    errors = [error for panel in dashboard["panels"] for error in panel_errors(panel)]
    assert not errors, "\n".join(errors)
    decoded = sdk_dashboard.Dashboard.from_json(dashboard)
    data_panels = [panel for panel in decoded.panels if isinstance(panel, sdk_dashboard.Panel)]
    # Not checked vacuously: the panels and queries are there, read by the models of their types.
    assert len(decoded.panels) == len(dashboard["panels"]) and data_panels
    for panel in data_panels:
        config = cogruntime.panelcfg_config(panel.type_val)
        assert isinstance(panel.options, config.options_from_json_hook.__self__), panel.title
        assert panel.targets and all(isinstance(query, sdk_prometheus.Dataquery) for query in panel.targets)


def test_dashboard_fields_have_the_sdk_types(dashboard):
    """The dashboard's own fields, its variables and annotations. Their Prometheus-specific fields (a variable's
    ``definition``, an annotation's ``expr`` and formats) are not in the SDK's generic models, so only the panels are
    also written back and compared."""
    decoded = sdk_dashboard.Dashboard.from_json(dashboard)
    errors = list(model_errors(decoded, "dashboard", skip=("panels",)))
    assert not errors, "\n".join(errors)
    assert [variable.name for variable in decoded.templating.list_val] == [
        variable["name"] for variable in dashboard["templating"]["list"]
    ]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Sets the field at ``path`` (keys and list indices, dot-separated) of a panel."""

    def corrupt(panel: dict[str, Any]) -> None:
        *parents, last = [int(key) if key.isdigit() else key for key in path.split(".")]
        for key in parents:
            panel = panel[key]
        panel[last] = value

    return corrupt


def _rename(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def corrupt(panel: dict[str, Any]) -> None:
        panel[new] = panel.pop(old)

    return corrupt


@pytest.mark.parametrize(
    ("title", "corrupt", "expected"),
    [
        ("Loss", _set("gridPos", "8x12"), "the SDK's Panel cannot read it"),
        ("Loss", _set("gridPos.h", "8"), ".grid_pos.h: '8' is not int"),
        ("Loss", _set("type", "graph"), "no model for panel type 'graph'"),
        ("Loss", _rename("fieldConfig", "fieldconfig"), ".fieldconfig: the SDK's model has no such field"),
        ("Loss", _set("options.legend.placment", "right"), ".options.legend.placment: the SDK's model has no such"),
        ("Loss", _set("fieldConfig.defaults.custom.lineWidth", "1"), ".line_width: '1' is not a number"),
        ("Loss", _set("fieldConfig.defaults.color.mode", "palette"), ".color.mode: 'palette' is none of"),
        ("Loss", _set("datasource.type", "loki"), "read as loki.Dataquery, not as a Prometheus query"),
        ("Global step", _set("targets.0.exemplar", "no"), ".exemplar: 'no' is not bool"),
        ("Since last step", _set("fieldConfig.defaults.thresholds.steps.1.value", "120"), "'120' is not a number"),
        ("Trainable share", _set("options.showThresholdMarkers", 1), ".show_threshold_markers: 1 is not bool"),
        ("Scrape targets", _set("transformations.0.id", 5), ".transformations[0].id_val: 5 is not str"),
    ],
)
def test_a_corrupted_panel_is_rejected_naming_it(dashboard, title, corrupt, expected):
    panel = copy.deepcopy(panel_named(dashboard, title))
    assert not panel_errors(panel)
    corrupt(panel)
    errors = panel_errors(panel)
    assert errors and all(error.startswith(f"panel {title!r}") for error in errors), errors
    assert any(expected in error for error in errors), errors


def test_a_corrupted_dashboard_field_is_rejected(dashboard):
    corrupted = copy.deepcopy(dashboard)
    corrupted["schemaVersion"] = "41"
    corrupted["templating"]["list"][1]["refresh"] = 7
    errors = list(model_errors(sdk_dashboard.Dashboard.from_json(corrupted), "dashboard", skip=("panels",)))
    assert errors == [
        "dashboard.schema_version: '41' is not int",
        "dashboard.templating.list_val[1].refresh: 7 is none of [0, 1, 2]",
    ]
