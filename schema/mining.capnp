# Bitcoin Core's block template interface, client side.
#
# One superset schema for the v31, 31.99 and v32 lines (they differ only by added
# methods). Field ordinals, types and default values are part of the wire format: a
# primitive field is stored XOR its default, so the defaults below must equal the node's.

@0xc77d03df6a41b505;

using Proxy = import "proxy.capnp";
using Common = import "common.capnp";

const maxMoney :Int64 = 2100000000000000;
const maxDouble :Float64 = 1.7976931348623157e308;
const defaultBlockReservedWeight :UInt32 = 8000;
const defaultCoinbaseOutputMaxAdditionalSigops :UInt32 = 400;

interface Mining @0xf9c68436df3af39e {
  isTestChain @0 (context :Proxy.Context) -> (result :Bool);
  isInitialBlockDownload @1 (context :Proxy.Context) -> (result :Bool);
  getTip @2 (context :Proxy.Context) -> (result :Common.BlockRef, hasResult :Bool);
  # timeout in milliseconds.
  waitTipChanged @3 (context :Proxy.Context, currentTip :Data, timeout :Float64 = .maxDouble)
      -> (result :Common.BlockRef);
  createNewBlock @4 (context :Proxy.Context, options :BlockCreateOptions, cooldown :Bool = true)
      -> (result :BlockTemplate);
  checkBlock @5 (context :Proxy.Context, block :Data, options :BlockCheckOptions)
      -> (reason :Text, debug :Text, result :Bool);
  # Runs on the node's event loop (no context); cancels the pending or next wait.
  interrupt @6 () -> ();
  # 31.99 and later.
  submitBlock @7 (context :Proxy.Context, block :Data) -> (reason :Text, debug :Text, result :Bool);
  # 31.99 and later; UNIMPLEMENTED on v31.0.
  getTransactionsByTxID @8 (context :Proxy.Context, txids :List(Data)) -> (result :List(Data));
  getTransactionsByWitnessID @9 (context :Proxy.Context, wtxids :List(Data)) -> (result :List(Data));
}

interface BlockTemplate @0xf9671ad841b2f622 {
  destroy @0 (context :Proxy.Context) -> ();
  getBlockHeader @1 (context :Proxy.Context) -> (result :Data);
  getBlock @2 (context :Proxy.Context) -> (result :Data);
  getTxFees @3 (context :Proxy.Context) -> (result :List(Int64));
  getTxSigops @4 (context :Proxy.Context) -> (result :List(Int64));
  getCoinbaseTx @5 (context :Proxy.Context) -> (result :CoinbaseTx);
  getCoinbaseMerklePath @6 (context :Proxy.Context) -> (result :List(Data));
  # v31 / 31.99. On the v32 line this ordinal throws WITHOUT submitting: try @10 first.
  submitSolution @7 (context :Proxy.Context, version :UInt32, timestamp :UInt32,
      nonce :UInt32, coinbase :Data) -> (result :Bool);
  waitNext @8 (context :Proxy.Context, options :BlockWaitOptions) -> (result :BlockTemplate);
  # Runs on the node's event loop (no context); cancels the pending or next waitNext.
  interruptWait @9 () -> ();
  # The v32 line's submitSolution; UNIMPLEMENTED before it.
  submitSolutionV32 @10 (context :Proxy.Context, version :UInt32, timestamp :UInt32,
      nonce :UInt32, coinbase :Data) -> (reason :Text, debug :Text, result :Bool);
}

struct BlockCreateOptions @0x80fca083ef81a559 {
  useMempool @0 :Bool = true;
  blockReservedWeight @1 :UInt64 = .defaultBlockReservedWeight;
  coinbaseOutputMaxAdditionalSigops @2 :UInt64 = .defaultCoinbaseOutputMaxAdditionalSigops;
}

struct BlockWaitOptions @0x9ba437d9de0c452e {
  # milliseconds
  timeout @0 :Float64 = .maxDouble;
  # satoshis
  feeThreshold @1 :Int64 = .maxMoney;
}

struct BlockCheckOptions @0x89f3f39b6c9dd162 {
  checkMerkleRoot @0 :Bool = true;
  checkPow @1 :Bool = true;
}

# What the node requires of the coinbase transaction (v31 and later).
struct CoinbaseTx @0xdc399c6d34ae7e69 {
  version @0 :UInt32;
  sequence @1 :UInt32;
  scriptSigPrefix @2 :Data;
  witness @3 :Data;
  blockRewardRemaining @4 :Int64;
  requiredOutputs @5 :List(Data);
  lockTime @6 :UInt32;
}
