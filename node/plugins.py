"""Loading plugins and calling their hooks with types.

The hooks and the plugin author's guide are in :mod:`node.hookspecs`; this module is the
node's side: :func:`load_plugin_manager` finds plugins through the ``liandong`` entry-point
group and validates them, and :class:`PluginHooks` is the only way the node core calls them, so
every call site is type-checked against :mod:`node.plugin_api`.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, cast

import pluggy

from node import hookspecs
from node.exchange.deadlines import DeadlineRule
from node.plugin_api import CaseChange, DeliveryConfirmation, Draft, InboundItem, NodeAPI, Verdict

__all__ = ["ENTRY_POINT_GROUP", "PluginError", "PluginHooks", "load_plugin_manager"]

ENTRY_POINT_GROUP = "liandong"
ALL_PLUGINS = "*"  # a watcher name meaning "the whole hook call"


class PluginError(Exception):
    """A plugin cannot be loaded: not installed, fails to import, or does not match the specs."""


def installed_plugin_names() -> list[str]:
    """Names of the plugins installed in the ``liandong`` entry-point group, sorted."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def load_plugin_manager(
    enabled: Sequence[str] | None = None, extra: Sequence[object] = ()
) -> pluggy.PluginManager:
    """Build the plugin manager the node runs with.

    :param enabled: names of the entry-point plugins to run (``[plugins] enabled`` in the node
        config); ``None`` runs every installed one.
    :param extra: plugin objects to register directly, after the entry-point ones (tests).
    :raises PluginError: an enabled name is not installed, a plugin fails to import, or a
        plugin has a ``liandong_*`` function that matches no hook (a typo would otherwise make
        the hook silently never run).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    try:
        if enabled is None:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        else:
            installed = installed_plugin_names()
            unknown = [name for name in enabled if name not in installed]
            if unknown:
                raise PluginError(
                    f"[plugins] enabled: {', '.join(map(repr, unknown))} not installed in "
                    f"entry-point group {ENTRY_POINT_GROUP!r} (installed: "
                    f"{', '.join(installed) or 'none'})"
                )
            # Loading only the enabled names (rather than loading all and unregistering the
            # rest) means a broken disabled plugin cannot stop the node from starting.
            for name in dict.fromkeys(enabled):
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"loading {ENTRY_POINT_GROUP!r} entry-point plugins: {exc}") from exc
    try:
        for plugin in extra:
            pm.register(plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc} (the hooks and their arguments: node/hookspecs.py)") from exc
    return pm


class PluginHooks:
    """Typed facade over the plugin manager's hooks.

    Broadcast hooks (``node_started``, ``poll_local_system``, ``deliveries_confirmed``) call
    each plugin on its own and log an exception with the plugin's name instead of raising: pluggy
    would otherwise stop at the first failing plugin, and one agency's broken adapter must not
    stop another's. ``hand_off`` lets exceptions through, because there they mean "retry later".
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm

    @property
    def names(self) -> list[str]:
        """Names of the registered plugins (entry-point name, or pluggy's name for extras)."""
        return [name for name, plugin in self._pm.list_name_plugin() if plugin is not None]

    def node_started(self, api: NodeAPI) -> None:
        """Call ``liandong_node_started`` on every plugin."""
        self._broadcast("liandong_node_started", api=api)

    def poll_local_system(self, api: NodeAPI) -> None:
        """Call ``liandong_poll_local_system`` on every plugin; the caller must not overlap
        two calls (the hook promises plugins it never runs concurrently with itself)."""
        self._broadcast("liandong_poll_local_system", api=api)

    def hand_off(self, item: InboundItem, api: NodeAPI) -> str | None:
        """The first plugin's non-``None`` reference, or ``None`` if no plugin took ``item``.

        An exception from a plugin propagates: the caller retries the hand-off later.
        """
        result: str | None = self._pm.hook.liandong_hand_off(item=item, api=api)
        return result

    def review_inbound(self, item: InboundItem, api: NodeAPI) -> Verdict | None:
        """The first plugin's verdict on ``item``, or ``None`` when no plugin gives one.

        An exception from a plugin propagates: the caller asks again later.
        """
        result: Verdict | None = self._pm.hook.liandong_review_inbound(item=item, api=api)
        return result

    @property
    def reviews(self) -> bool:
        """Whether any plugin implements ``liandong_review_inbound``."""
        return bool(self._pm.hook.liandong_review_inbound.get_hookimpls())

    def redact(self, draft: Draft, recipient: str, api: NodeAPI) -> Draft | None:
        """The first plugin's version of ``draft`` for ``recipient``, or ``None`` to send it
        as it is. Exceptions propagate: the caller refuses the submission."""
        result: Draft | None = self._pm.hook.liandong_redact(
            draft=draft, recipient=recipient, api=api
        )
        return result

    @property
    def redacts(self) -> bool:
        """Whether any plugin implements ``liandong_redact`` (else there is nothing to ask)."""
        return bool(self._pm.hook.liandong_redact.get_hookimpls())

    def deadline_rules(self, api: NodeAPI) -> list[DeadlineRule]:
        """Every plugin's rules, in the order they override each other; a failing plugin's
        are left out (and logged)."""
        caller: pluggy.HookCaller = self._pm.hook.liandong_deadline_rules
        rules: list[DeadlineRule] = []
        # In registration order (get_hookimpls' order), so a later plugin's rule wins.
        for impl in caller.get_hookimpls():
            try:
                given = _call(impl, api=api)
                rules.extend(cast(Sequence[DeadlineRule], given or ()))
            except Exception:
                api.log.exception(
                    "plugin hook failed", hook="liandong_deadline_rules", plugin=impl.plugin_name
                )
        return rules

    def deliveries_confirmed(
        self, confirmations: Sequence[DeliveryConfirmation], api: NodeAPI
    ) -> None:
        """Call ``liandong_deliveries_confirmed`` on every plugin."""
        self._broadcast("liandong_deliveries_confirmed", confirmations=confirmations, api=api)

    @property
    def case_watchers(self) -> list[str]:
        """Names of the plugins implementing ``liandong_cases_changed``, in call order.

        Each is told on its own (``cases_changed``), so each keeps its own place in the
        changes. With a hook wrapper among them the hook is called whole, as one watcher
        named ``*``: a wrapper must see the whole call.
        """
        impls = self._pm.hook.liandong_cases_changed.get_hookimpls()
        if _has_wrapper(impls):
            return [ALL_PLUGINS]
        return [impl.plugin_name for impl in reversed(impls)]

    def cases_changed(self, plugin: str, changes: Sequence[CaseChange], api: NodeAPI) -> None:
        """Call ``plugin``'s ``liandong_cases_changed`` (every plugin's, for ``*``).

        An exception propagates: the caller offers the same changes again later.
        """
        caller: pluggy.HookCaller = self._pm.hook.liandong_cases_changed
        if plugin == ALL_PLUGINS:
            caller(changes=changes, api=api)
            return
        [impl] = [impl for impl in caller.get_hookimpls() if impl.plugin_name == plugin]
        _call(impl, changes=changes, api=api)

    def _broadcast(self, hook_name: str, **kwargs: Any) -> None:
        api: NodeAPI = kwargs["api"]
        caller: pluggy.HookCaller = getattr(self._pm.hook, hook_name)
        impls = caller.get_hookimpls()
        if _has_wrapper(impls):
            # A wrapper must see the whole call, so isolation is given up for this hook.
            try:
                caller(**kwargs)
            except Exception:
                api.log.exception("plugin hook failed", hook=hook_name)
            return
        # In pluggy's order: from the end of get_hookimpls(). Not via subset_hook_caller,
        # which needs hashable plugin objects.
        for impl in reversed(impls):
            try:
                _call(impl, **kwargs)
            except Exception:
                api.log.exception("plugin hook failed", plugin=impl.plugin_name, hook=hook_name)


def _call(impl: pluggy.HookImpl, **arguments: Any) -> Any:
    """Call one implementation the way pluggy's _multicall does: with the arguments it
    declares, by name (an implementation may declare fewer than the hook offers)."""
    return impl.function(*(arguments[name] for name in impl.argnames))


def _has_wrapper(impls: Sequence[pluggy.HookImpl]) -> bool:
    return any(impl.hookwrapper or impl.wrapper for impl in impls)
