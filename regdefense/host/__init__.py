"""The plugin host: the hooks, the typed host interface, the data contract, the ``Defense`` base, discovery.

Plugin authors import from here (``regdefense.host.defense.Defense``, ``regdefense.host.hookspecs``) or from the
package face (``from regdefense import Defense, hookimpl, option``). ``regdefense.host`` keeps the names it had as one
module (``Host``, ``TrainingHost``): they come from :mod:`regdefense.host.interface`.
"""

from __future__ import annotations

from regdefense._moved import forward

__getattr__ = forward(__name__, "regdefense.host.interface")
