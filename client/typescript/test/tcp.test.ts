// A daemon on TCP: every call but health needs `authorization: Bearer <token>`.
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import * as path from "node:path";
import { after, before, describe, it } from "node:test";
import { MlxdClient, UnauthenticatedError } from "../src/index.js";
import { Daemon, removeDir, tempDir } from "./helpers.js";

const TOKEN = "ts-test-token-0123456789";
let root: string;
let daemon: Daemon;

before(async () => {
  delete process.env.MLXD_TOKEN; // the client falls back to it
  root = tempDir();
  const tokenFile = path.join(root, "token");
  writeFileSync(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
  daemon = await Daemon.start(root, { token: TOKEN, tokenFile });
});

after(async () => {
  await daemon?.stop();
  removeDir(root);
});

describe("TCP with a token", () => {
  it("connects and calls with the token", async () => {
    assert.match(daemon.address, /^127\.0\.0\.1:\d+$/);
    const client = await MlxdClient.connect(daemon.address, { token: TOKEN });
    try {
      assert.equal((await client.initialize()).protocolVersion, 1);
      assert.deepEqual((await client.listModels()).models, []);
    } finally {
      client.close();
    }
  });

  for (const [name, token] of [["without a token", undefined], ["with a wrong token", "wrong"]] as const) {
    it(`is refused ${name} (UNAUTHENTICATED, BAD_TOKEN)`, async () => {
      const client = new MlxdClient(daemon.address, { token });
      try {
        await assert.rejects(client.initialize(), (err: unknown) => {
          assert.ok(err instanceof UnauthenticatedError);
          assert.equal(err.code, "UNAUTHENTICATED");
          assert.equal(err.reason, "BAD_TOKEN");
          return true;
        });
      } finally {
        client.close();
      }
    });
  }
});
