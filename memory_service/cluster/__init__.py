"""Cluster mode: the same service on several nodes over engines built for each job (DESIGN.md "Beyond one machine").

- `etcd.Coordinator`: stream ownership (a key under the node's lease; its create revision is the owner's epoch),
  fenced writes of each stream's log head, node membership;
- `s3.ObjectStore`: the durable tier (any S3-compatible object store, through boto3);
- `memory_service.store.cluster_store.ClusterStore`: a `TensorStore` whose commits are durable in S3 and fenced
  in etcd before they are applied to the node's local LMDB, which caches what the node owns;
- `node.ClusterBank`: a MemoryBank that adopts a stream (claim, replay, open) on its first call, and answers
  `NotOwner` with the owner's address for streams another node owns.
- `directory.EtcdDirectory`: the live nodes' addresses, for a client given an `etcd://` target.
Nothing here is imported unless the service runs with `--cluster`, except `directory` by the client (it loads etcd3gw
only for an `etcd://` target).
"""
