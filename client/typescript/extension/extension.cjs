// VS Code entry point. The extension host loads CommonJS and is the only place "vscode" resolves, so this shim
// requires it and hands it to the compiled ESM adapter (`npm run build` first).
const vscode = require("vscode");
const adapter = import("../dist/src/extension/vscode.js");

exports.activate = async (context) => (await adapter).activateWith(vscode, context);
exports.deactivate = async () => (await adapter).deactivate();
