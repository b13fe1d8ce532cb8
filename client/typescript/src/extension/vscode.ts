/**
 * The VS Code side of the extension: adapts `vscode.window` to the `Ui` of commands.ts and registers the
 * commands contributed in extension/package.json. Only the few API members used are declared here (as
 * `VscodeApi`), so this compiles and is tested without the `vscode` package. extension/extension.cjs, the
 * extension's entry point, requires the real module and passes it to activateWith().
 */
import { commandTable, lazyClient, type ClientProvider, type Ui } from "./commands.js";

type Thenable<T> = PromiseLike<T>;
interface Disposable {
  dispose(): unknown;
}
interface CancellationToken {
  isCancellationRequested: boolean;
  onCancellationRequested(listener: () => unknown): Disposable;
}
interface Uri {
  fsPath: string;
}

/** The subset of `typeof import("vscode")` this adapter uses. */
export interface VscodeApi {
  window: {
    withProgress<R>(
      options: { location: number; title?: string; cancellable?: boolean },
      task: (
        progress: { report(value: { message?: string; increment?: number }): void },
        token: CancellationToken,
      ) => Thenable<R>,
    ): Thenable<R>;
    showOpenDialog(options: {
      canSelectFiles?: boolean;
      canSelectFolders?: boolean;
      canSelectMany?: boolean;
      title?: string;
    }): Thenable<Uri[] | undefined>;
    showInputBox(options: { prompt?: string; value?: string }): Thenable<string | undefined>;
    showQuickPick(items: string[], options: { title?: string }): Thenable<string | undefined>;
    showWarningMessage(message: string, options: { modal?: boolean }, ...items: string[]): Thenable<string | undefined>;
    showInformationMessage(message: string): Thenable<unknown>;
    showErrorMessage(message: string): Thenable<unknown>;
  };
  commands: { registerCommand(command: string, callback: () => unknown): Disposable };
  workspace: { getConfiguration(section: string): { get<T>(key: string): T | undefined } };
  ProgressLocation: { Notification: number };
}

export interface ExtensionContext {
  subscriptions: Disposable[];
}

/** A `Ui` backed by VS Code: notifications with a cancellable progress bar, native open dialogs. */
export function vscodeUi(vscode: VscodeApi): Ui {
  const w = vscode.window;
  return {
    showProgress: (title, task) =>
      Promise.resolve(
        w.withProgress({ location: vscode.ProgressLocation.Notification, title, cancellable: true }, (progress, token) => {
          const abort = new AbortController();
          const sub = token.onCancellationRequested(() => abort.abort());
          return task((step) => progress.report(step), abort.signal).finally(() => sub.dispose());
        }),
      ),
    pickFolder: async (title) =>
      (await w.showOpenDialog({ canSelectFolders: true, canSelectFiles: false, title }))?.[0]?.fsPath,
    pickFiles: async (title) =>
      (await w.showOpenDialog({ canSelectFiles: true, canSelectMany: true, title }))?.map((u) => u.fsPath),
    pickOne: async (title, items) => w.showQuickPick(items, { title }),
    inputText: async (prompt, value) => w.showInputBox({ prompt, value }),
    confirm: async (message, action) => (await w.showWarningMessage(message, { modal: true }, action)) === action,
    showInfo: (message) => void w.showInformationMessage(message),
    showError: (message) => void w.showErrorMessage(message),
  };
}

let client: ReturnType<typeof lazyClient> | undefined;

/** Register every command against `vscode`; settings `mlx.address` / `mlx.token` choose the daemon. */
export function activateWith(vscode: VscodeApi, context: ExtensionContext): ClientProvider {
  const config = vscode.workspace.getConfiguration("mlx");
  client = lazyClient(config.get<string>("address") || undefined, { token: config.get<string>("token") || undefined });
  for (const [id, run] of Object.entries(commandTable(vscodeUi(vscode), client))) {
    context.subscriptions.push(vscode.commands.registerCommand(id, run));
  }
  return client;
}

export function deactivate(): void {
  client?.close();
  client = undefined;
}
