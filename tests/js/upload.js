// Upload one file to a tus endpoint with tus-js-client, in 1 MiB chunks; exit 0 on success.
// node upload.js ENDPOINT FILE RELATIVE_PATH SHA256
"use strict";
const fs = require("fs");
const tus = require("tus-js-client");

const [endpoint, file, relativePath, checksum] = process.argv.slice(2);
const data = fs.readFileSync(file);
const upload = new tus.Upload(data, {
  endpoint,
  chunkSize: 1024 * 1024,
  retryDelays: [0, 500],
  metadata: { relative_path: relativePath, client_id: "tus-js-client", checksum },
  onError(error) {
    console.error("upload failed:", error.message || error);
    process.exit(1);
  },
  onSuccess() {
    console.log("uploaded to", upload.url);
    process.exit(0);
  },
});
upload.start();
