"""Attack simulation, to test defenses: an ``[attack]`` section makes a seeded fixed
fraction of the clients malicious from a given round.

Model poisoning on the cohort's (n, d) delta matrix (`updates`): sign_flip, scaling,
gaussian, alie ("A little is enough", Baruch et al., NeurIPS 2019), same_value,
model_replacement (Bagdasaryan et al., AISTATS 2020); data poisoning before training:
label_flip.  Colluding attackers share their honest updates; independent ones use
only their own.  `Attack` is the part the transport calls; `build_attack` makes one
from the configuration.
"""

from .attack import ATTACK_KINDS, CLIENT_ATTACK_OPTIONS, Attack, DeviceAttack, build_attack, client_attack, flip_labels, malicious_clients
from .updates import (
    UPDATE_ATTACKS,
    AttackContext,
    alie,
    alie_z_max,
    gaussian,
    model_replacement,
    same_value,
    scaling,
    sign_flip,
)

__all__ = [
    "ATTACK_KINDS",
    "CLIENT_ATTACK_OPTIONS",
    "UPDATE_ATTACKS",
    "Attack",
    "AttackContext",
    "DeviceAttack",
    "alie",
    "alie_z_max",
    "build_attack",
    "client_attack",
    "flip_labels",
    "gaussian",
    "malicious_clients",
    "model_replacement",
    "same_value",
    "scaling",
    "sign_flip",
]
