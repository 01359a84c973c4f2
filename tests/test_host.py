"""The typed host interface: the loop's Trainer implements what a training hook is promised, evaluation's rebuild an
honest part of it, and no module of the host layer depends on the loop, even for types."""

import grimp

from regdefense.host.interface import Host, TrainingHost
from regdefense.training.assembly import Assembly
from regdefense.training.loop import Trainer
from regdefense.training.run import load_config


def test_the_trainer_is_a_training_host_and_the_rebuild_assembly_a_host():
    cfg = load_config(overrides=["train.progress=false", "train.device=cpu"])
    trainer = Trainer(cfg)
    assert isinstance(trainer, TrainingHost) and isinstance(trainer, Host)
    assembly = Assembly(cfg)
    assert isinstance(assembly, Host)
    assert not isinstance(assembly, TrainingHost)  # no optimizer, loader, backward: not promised, not offered


def test_no_circle_even_counting_type_only_imports():
    """The drawn graph of the last round had an 8-module circle through ``Trainer`` annotations (core, extra,
    hookspecs, parts, plugins, restore, services, trainer); with the host typed by a protocol there is none."""
    graph = grimp.build_graph("regdefense", include_external_packages=False, exclude_type_checking_imports=False)
    circles = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                circles.append((importer, *back))
    assert circles == []
    for module in ("regdefense.host.hookspecs", "regdefense.host.core", "regdefense.training.services", "regdefense.host.interface"):
        assert not graph.chain_exists(importer=module, imported="regdefense.training.loop"), module
