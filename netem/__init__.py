"""netem: network-emulation profiles in `tc netem` terms, and the links that apply them.

- :class:`Impairment` / :class:`Profile`: one direction / a whole link, as ``tc netem`` options
  (``load_profile("lossy")``, ``Profile.from_options(delay="40ms", loss="2%")``).
- :class:`VirtualLink`: the link in virtual time, for sans-I/O tests and simulations.
- ``netem.relay`` (UDP relay on loopback, asyncio) and ``netem.netns`` (two network
  namespaces joined by real ``tc netem`` or a userspace TUN forwarder) run the same
  model (``netem.model``) in real time.
"""

from netem.model import NetemQueue
from netem.profile import Impairment, Profile, Slot, list_profiles, load_profile
from netem.virtual import FORWARD, REVERSE, VirtualLink

__all__ = [
    "FORWARD",
    "REVERSE",
    "Impairment",
    "NetemQueue",
    "Profile",
    "Slot",
    "VirtualLink",
    "list_profiles",
    "load_profile",
]
