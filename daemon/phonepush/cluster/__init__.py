"""Several daemons on one PostgreSQL store: membership, leases, phone claims, the timers' leader
and notifications (:mod:`phonepush.cluster.coordinator`), and the floor audio pages take on their
phones (:mod:`phonepush.cluster.floor`). Used by the app on PostgreSQL only;
it knows the store through :mod:`phonepush.cluster.interface` and never imports the dispatcher.
"""

from phonepush.cluster.coordinator import Cluster, instance_id
from phonepush.cluster.floor import Floor
from phonepush.cluster.interface import ClusterStore, Lanes

__all__ = ["Cluster", "ClusterStore", "Floor", "Lanes", "instance_id"]
