# Types shared by Bitcoin Core's IPC interfaces (file id must match the node's).

@0xcd2c6232cb484a28;

# A block by hash (32 bytes, internal byte order) and height.
struct BlockRef @0xb3be4b8949350369 {
  hash @0 :Data;
  height @1 :Int32;
}
