# Bitcoin Core's IPC bootstrap interface (the capability the node's socket serves).
#
# Superset for the v31, 31.99 and v32 lines. `makeMiningV30 @2` is the v30 line's
# `makeMining`; on v31 and later it throws, and `makeMining @3` is UNIMPLEMENTED on v30,
# which is how sv2-tpd tells the lines apart without side effects.

@0xf2c5cfa319406aa6;

using Proxy = import "proxy.capnp";
using Mining = import "mining.capnp";

interface Init @0x8838c700ba5cba65 {
  construct @0 (threadMap :Proxy.ThreadMap) -> (threadMap :Proxy.ThreadMap);
  # Echo test interface; unused by sv2-tpd, kept so the ordinals line up.
  makeEcho @1 (context :Proxy.Context) -> (result :AnyPointer);
  makeMiningV30 @2 (context :Proxy.Context) -> (result :Mining.Mining);
  makeMining @3 (context :Proxy.Context) -> (result :Mining.Mining);
}
