# libmultiprocess' proxy protocol, client side, as sv2-tpd uses it.
#
# Written for sv2-tpd from the wire facts of Bitcoin Core's IPC layer: the file id,
# interface ids and ordinals must match the node's; names are ours. The annotations the
# node's copy carries only drive its C++ code generator and are absent here.

@0xcc316e3f71a040fb;

# Creates node-side worker threads. Obtained from `Init.construct`.
interface ThreadMap @0xee5e37179ad9dc9d {
  makeThread @0 (name :Text) -> (result :Thread);
  makePool @1 (count :UInt32) -> ();
}

# A node-side OS thread; it runs the calls whose context names it, one at a time, and
# exits when the last reference to it is released.
interface Thread @0x81c1e2600d0b56c5 {
  getName @0 () -> (result :Text);
}

# Passed as the first parameter of every call that runs on a worker thread.
struct Context @0x9c44e6645d0b22c6 {
  thread @0 :Thread;
  callbackThread @1 :Thread;
}
