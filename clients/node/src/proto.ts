import { existsSync } from "node:fs";
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

/** The public API file, relative to the proto root. */
export const PROTO_FILE = "embedq/v1/embedq.proto";

/**
 * Where `embedq/v1/embedq.proto` lives. The package carries a copy in its own
 * `protos/` folder (copied from the repository's `protos/`, the single source
 * of truth, by `npm run build`, so also by `prepare` before a pack). Order:
 * the explicit `protoRoot`, env `EMBEDQ_PROTO_ROOT`, then the first `protos/`
 * folder holding the file in this package's folder or a parent: the package's
 * own copy (this file is `dist/src/proto.js`), or in a checkout that was not
 * built yet, the repository's `clients/node/../../protos`.
 */
export function resolveProtoRoot(protoRoot?: string): string {
  const explicit = protoRoot ?? process.env.EMBEDQ_PROTO_ROOT;
  if (explicit) {
    const root = path.resolve(explicit);
    if (!existsSync(path.join(root, PROTO_FILE))) {
      throw new Error(`protoRoot ${root} has no ${PROTO_FILE}`);
    }
    return root;
  }
  let dir = __dirname;
  for (;;) {
    const candidate = path.join(dir, "protos");
    if (existsSync(path.join(candidate, PROTO_FILE))) return candidate;
    const parent = path.dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  throw new Error(
    `cannot find protos/${PROTO_FILE} above ${__dirname} (run \`npm run build\`, which copies it into the package); pass the protoRoot option or set EMBEDQ_PROTO_ROOT`,
  );
}

export const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false, // camelCase fields: topK, workersAlive, maxSeqLength, ...
  longs: String,
  enums: String, // enum values come back as names ("DTYPE_FLOAT32"); names or numbers go out
  defaults: true,
  oneofs: true,
};

type EmbedderConstructor = grpc.ServiceClientConstructor;
const cache = new Map<string, EmbedderConstructor>();

/** The generated-at-runtime `embedq.v1.Embedder` client constructor. */
export function embedderClient(protoRoot?: string): EmbedderConstructor {
  const root = resolveProtoRoot(protoRoot);
  let ctor = cache.get(root);
  if (!ctor) {
    const definition = protoLoader.loadSync(path.join(root, PROTO_FILE), {
      ...LOADER_OPTIONS,
      includeDirs: [root],
    });
    const loaded = grpc.loadPackageDefinition(definition) as unknown as {
      embedq: { v1: { Embedder: EmbedderConstructor } };
    };
    ctor = loaded.embedq.v1.Embedder;
    cache.set(root, ctor);
  }
  return ctor;
}
