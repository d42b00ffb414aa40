/**
 * Notifications for what happens to FlexAI kernels away from the person's eyes: a start
 * that failed (fix first, the whole error one click away), an instance deleted with what
 * it ran and cost, a limit about to act or acting.
 */
import { Dialog, Notification, showDialog } from '@jupyterlab/apputils';
import {
  failureOf,
  formatCost,
  formatDuration,
  limitIn,
  limitWarning,
  notebookOf
} from './format';
import { problemWidget } from './problem';
import { type ComputeState, type IPhaseEmission, uptimeOf } from './state';

/**
 * Notify about `state`'s kernels; `chooseGPU(path)` opens the GPU dialog of a notebook,
 * `installed()` tells the GPU types (lower case) that have a kernelspec here.
 */
export function notifyAbout(
  state: ComputeState,
  chooseGPU: (path: string) => boolean,
  installed: () => ReadonlySet<string>
): void {
  const warned = new Set<string>();
  state.phase.connect((_, emission) => onPhase(emission, chooseGPU, installed()));
  state.changed.connect(() => {
    for (const synced of state.instances) {
      const { model } = synced;
      const notebook = notebookOf(model.phases);
      const kernel = `The FlexAI kernel${notebook ? ` for ${notebook}` : ''}`;
      const warning = limitWarning(model, uptimeOf(synced, Date.now()), kernel);
      if (warning && !warned.has(model.kernel_id)) {
        warned.add(model.kernel_id);
        Notification.warning(warning.text, { autoClose: false });
      }
    }
  });
}

function onPhase(
  { event, start, cancelled }: IPhaseEmission,
  chooseGPU: (path: string) => boolean,
  installed: ReadonlySet<string>
): void {
  const where = start.path ? ` for ${start.path}` : '';
  switch (event.phase) {
    case 'failed': {
      if (cancelled) {
        // Asked for: the notebook stays without a kernel, with no dialog about it.
        replaceJupyterDialogs(event.message ?? '', start.path, null);
        return; // said with the instance's cost at "shut down"
      }
      replaceJupyterDialogs(event.message ?? '', start.path, chooseGPU);
      const failure = failureOf(event.message ?? 'the start failed', installed);
      const actions: Notification.IAction[] = [
        {
          label: 'Show error',
          caption: 'The whole error message',
          callback: () => void showFailure(failure.fix, failure.message, where)
        }
      ];
      const path = start.path;
      if (path) {
        actions.unshift({
          label: 'Choose a GPU',
          caption: `Open the GPU dialog of ${path}`,
          callback: () => chooseGPU(path)
        });
      }
      Notification.error(`${failure.fix} The FlexAI kernel${where} did not start.`, {
        autoClose: false,
        actions
      });
      return;
    }
    case 'limit reached': {
      const limit = limitIn(event.message ?? '') ?? 'limit';
      Notification.warning(
        `The FlexAI kernel${where} reached its ${limit}: it is being shut down and its ` +
          'instance deleted.',
        { autoClose: false }
      );
      return;
    }
    case 'shut down': {
      if (!event.instance_id) {
        return;
      }
      const cost = event.cost_usd === undefined ? '' : `, ${formatCost(event.cost_usd)}`;
      // keep_alive: the instance waits for the next kernel rather than being deleted.
      const parked = (event.message ?? '').startsWith('parked');
      const deleted =
        `instance ${event.instance_id} ${parked ? 'parked for the next kernel' : 'deleted'}, ` +
        `ran ${formatDuration(event.elapsed_seconds)}${cost}${parked ? ' so far' : ''}.`;
      Notification.info(
        cancelled
          ? `The start${where} was cancelled: ${deleted}`
          : deleted.charAt(0).toUpperCase() + deleted.slice(1),
        { autoClose: 10000 }
      );
    }
  }
}

/**
 * After a failed start JupyterLab shows the session request's error in its own dialog, one
 * unwrapped line that long errors run out of, and may then offer its kernel selector with
 * the kernel that just failed preselected. The notification says the error fix first, so
 * the first is closed; the second is replaced by the GPU dialog (`chooseGPU`), where a
 * type without capacity is greyed and its price shown, or only closed (`null`: a start
 * the person cancelled). Both follow the event (by the instance's teardown), so they are
 * looked for a while.
 */
function replaceJupyterDialogs(
  message: string,
  path: string | null,
  chooseGPU: ((path: string) => boolean) | null,
  timeout = 30000
): void {
  const text = message.trim();
  const name = path ? `"${path.split('/').pop()}"` : null;
  const deadline = Date.now() + timeout;
  const look = (): void => {
    for (const dialog of document.querySelectorAll('.jp-Dialog')) {
      const body = dialog.querySelector('.jp-Dialog-body');
      const error = body?.querySelector('pre')?.textContent ?? '';
      if (text && error.includes(text)) {
        dialog.querySelector<HTMLElement>('.jp-Dialog-button.jp-mod-accept')?.click();
      } else if (
        path &&
        name &&
        body?.querySelector('select') &&
        body.querySelector('label')?.textContent?.endsWith(name)
      ) {
        dialog.querySelector<HTMLElement>('.jp-Dialog-button.jp-mod-reject')?.click();
        chooseGPU?.(path);
        return;
      }
    }
    if (Date.now() < deadline) {
      window.setTimeout(look, 200);
    }
  };
  look();
}

async function showFailure(fix: string, message: string, where: string): Promise<void> {
  await showDialog({
    title: `The FlexAI kernel${where} did not start`,
    body: problemWidget({ fix, message }),
    buttons: [Dialog.okButton({ label: 'Close' })]
  });
}
