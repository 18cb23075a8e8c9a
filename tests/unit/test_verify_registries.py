"""Bundles carry every registry the node ran on: a key a later registry dropped still verifies
what was signed while it was valid; a registry the operator did not sign is refused."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from node.audit.checkpoint import Checkpoint
from node.audit.verify import blob_key, trusted_registries
from node.federation import MemberKey, RegistryError, sign_registry
from tests.unit.test_federation import T0, member, new_key, registry

ECOLOGY = "140400/ecology"


def test_a_dropped_key_still_verifies_through_the_earlier_registry() -> None:
    operator = new_key()
    old_key, new = new_key(), new_key()
    rotated_at = T0 + timedelta(days=10)
    before = registry(
        serial=1,
        members=(member(ECOLOGY, MemberKey(old_key.key_id, old_key.public_bytes(), T0, None)),),
    )
    # The operator published serial 2 listing only the new key: the old one is gone.
    after = replace(
        before,
        serial=2,
        members=(member(ECOLOGY, MemberKey(new.key_id, new.public_bytes(), rotated_at, None)),),
    )
    signed_after, signed_before = (sign_registry(r, operator) for r in (after, before))
    alone = trusted_registries(signed_after, [], operator.private_key.public_key())
    assert old_key.key_id not in alone.public_keys(ECOLOGY)

    history = trusted_registries(signed_after, [signed_before], operator.private_key.public_key())
    assert history.current.serial == 2 and len(history.all) == 2
    assert set(history.public_keys(ECOLOGY)) == {old_key.key_id, new.key_id}
    assert history.key_valid_at(ECOLOGY, old_key.key_id, T0 + timedelta(days=1))
    assert not history.key_valid_at(ECOLOGY, new.key_id, T0 + timedelta(days=1))
    assert {v.public_key for v in history.log_verifiers(ECOLOGY)} == {
        old_key.public_bytes(),
        new.public_bytes(),
    }


def test_an_earlier_registry_signed_by_someone_else_is_refused() -> None:
    operator, intruder = new_key(), new_key()
    current = sign_registry(registry(serial=2), operator)
    forged = sign_registry(registry(serial=1), intruder)
    with pytest.raises(RegistryError, match=r"registries/1\.json"):
        trusted_registries(current, [forged], operator.private_key.public_key())
    other_federation = sign_registry(registry(serial=1, federation="elsewhere"), operator)
    with pytest.raises(ValueError, match="federation 'elsewhere'"):
        trusted_registries(current, [other_federation], operator.private_key.public_key())


def test_what_was_checked_for_one_signer_is_not_taken_as_checked_for_another() -> None:
    """A receipt's bytes, or a receiver's checkpoint, verified as one agency's must be
    verified again when a bundle lists them under another agency."""
    operator = new_key()
    key = new_key()
    ecology = member(ECOLOGY, MemberKey(key.key_id, key.public_bytes(), T0, None))
    signed = sign_registry(registry(serial=1, members=(ecology,)), operator)
    history = trusted_registries(signed, [], operator.private_key.public_key())
    opened = Checkpoint("example/ecology", 1, bytes(32))
    history.opened_checkpoints(ECOLOGY).add(b"note", opened)
    assert history.opened_checkpoints("140400/police").get(b"note") is None
    assert history.opened_checkpoints(ECOLOGY).get(b"note") == opened
    receipt = b"signed receipt bytes"
    keys = {blob_key(b"r", receipt, signer) for signer in (ECOLOGY, "140400/police", "")}
    assert len(keys) == 3
