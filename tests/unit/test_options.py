"""The one option table: every API option is a CLI flag, and argv round-trips."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ctrmig import cli, options
from ctrmig.errors import OptionError
from ctrmig.options import CheckpointOptions, RestoreOptions


def _non_default(cls: type[Any]) -> Any:
    """Options of ``cls`` with every CLI-visible field off its default."""
    values: dict[str, Any] = {}
    for f, spec in options.specs(cls):
        if spec.internal:
            continue
        if f.name == "compression":
            values[f.name] = "gzip"
        elif f.name == "name":
            values[f.name] = "web-2"
        elif f.name == "publish_ports":
            values[f.name] = ("8080:80", "9090:90")
        elif f.name == "include_image":
            values[f.name] = False
        elif f.type == "str | None":  # the direct route's page_images, lazy_page_server
            values[f.name] = f"value-of-{f.name}"
        else:
            values[f.name] = True
    return cls(**values)


@pytest.mark.parametrize(("cls", "command", "fixed"), [
    (CheckpointOptions, cli.checkpoint, ["web", "-o", "-"]),
    (RestoreOptions, cli.restore, ["-"]),
])
def test_cli_args_round_trip_through_the_real_parser(cls: type[Any], command: Any,
                                                      fixed: list[str]) -> None:
    """What the remote adapter sends is what ctrmig on the other host parses back."""
    for opts in (cls(), _non_default(cls)):
        ctx = command.make_context(command.name, [*fixed, *options.cli_args(opts)])
        assert cli._built(cls, ctx.params) == opts


def test_include_image_true_round_trips() -> None:
    opts = CheckpointOptions(include_image=True)
    ctx = cli.checkpoint.make_context("checkpoint", ["w", "-o", "-", *options.cli_args(opts)])
    assert cli._built(CheckpointOptions, ctx.params) == opts


@pytest.mark.parametrize(("cls", "command", "excluded"), [
    (CheckpointOptions, cli.checkpoint, set()),
    (RestoreOptions, cli.restore, set()),
    (CheckpointOptions, cli.migrate, {"leave_running"}),
    # migrate sets the direct route's own (page_images, lazy_page_server) itself
    (RestoreOptions, cli.migrate, {"page_images", "lazy_page_server"}),
])
def test_every_api_option_is_a_cli_flag(cls: type[Any], command: Any,
                                        excluded: set[str]) -> None:
    names = {p.name for p in command.params}
    wanted = {f.name for f, spec in options.specs(cls) if not spec.internal} - excluded
    assert wanted <= names, wanted - names


def test_build_refuses_unknown_names_and_wrong_kinds() -> None:
    with pytest.raises(OptionError, match="unknown option"):
        options.build(CheckpointOptions, None, {"leave_runing": True})
    with pytest.raises(OptionError, match="true or false"):
        options.build(RestoreOptions, None, {"lazy_pages": "yes"})
    built = options.build(RestoreOptions, RestoreOptions(keep=True), {"publish_ports": ["1:2"]})
    assert built == RestoreOptions(keep=True, publish_ports=("1:2",))


def test_derived_engine_spellings() -> None:
    opts = RestoreOptions(tcp_established=True, file_locks=True, publish_ports=("8:80",))
    assert options.criu_args(opts) == ["--tcp-established", "--file-locks"]
    assert options.criu_args(opts, only=frozenset({"file_locks"})) == ["--file-locks"]
    params = options.podman_params(opts)
    assert params["tcpEstablished"] is True and params["publishPorts"] == ["8:80"]
    assert "lazy_pages" not in params and "lazyPages" not in params
    assert options.for_engine(dataclasses.replace(opts, allow_privileged=True)) == {
        "tcp_established", "file_locks", "publish_ports"}


def test_a_remote_error_keeps_its_class() -> None:
    """ctrmig over ssh reports NameInUseError as NameInUseError, not a bare EngineError."""
    from ctrmig.engines.remote import _remote_error
    from ctrmig.errors import ERROR_LINE, CommandError, EngineError, NameInUseError, named

    stderr = ("ctrmig: error: a runc container named 'web' already exists\nhint: pick another\n"
              + ERROR_LINE + '{"type": "NameInUseError", "message": "taken", "hint": "h"}\n')
    err = _remote_error(stderr, "ctrmig restore on ssh://b failed (exit 1)")
    assert type(err) is NameInUseError and err.hint == "h" and "taken" in err.message
    assert type(_remote_error("bash: ctrmig: command not found\n", "x")) is EngineError
    assert named("CommandError") is EngineError and named("NoSuchThing") is EngineError
    assert issubclass(named("ChecksumError"), CommandError) is False
