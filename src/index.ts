/**
 * flexai-provisioner's JupyterLab / Notebook 7 extension: a GPU button in each notebook's
 * toolbar (the GPU dialog), the notebook's boot progress and running cost (status bar, or
 * the toolbar where there is no status bar), notifications, and the instances dialog.
 * It talks to the server only over `/api/compute` and the jupyter_events stream.
 */
import type { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import type { DocumentRegistry } from '@jupyterlab/docregistry';
import { INotebookTracker, type INotebookModel, type NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import type { IDisposable } from '@lumino/disposable';
import { Widget } from '@lumino/widgets';

import { formatPrice } from './format';
import { showInstances } from './instances';
import { findSpec, flexaiSpecs } from './kernels';
import { notifyAbout } from './notify';
import { chooseGPU } from './picker';
import { ComputeState } from './state';
import { ComputeStatus } from './status';

const COMMANDS = {
  chooseGPU: 'flexai:choose-gpu',
  instances: 'flexai:show-instances'
};

/** The toolbar's GPU button: the notebook's GPU type and price, opening the GPU dialog. */
class GPUButton extends Widget {
  constructor(
    private _panel: NotebookPanel,
    private _state: ComputeState
  ) {
    super({ node: document.createElement('div') });
    this.addClass('jp-FlexAI-gpuButton');
    const button = document.createElement('button');
    button.className = 'jp-ToolbarButtonComponent jp-Button jp-mod-minimal';
    button.append(this._label);
    this._label.className = 'jp-ToolbarButtonComponent-label';
    button.addEventListener('click', () => void chooseGPU(this._panel, this._state));
    this.node.append(button);
    this._button = button;
    _panel.sessionContext.kernelChanged.connect(this.update, this);
    _state.changed.connect(this.update, this);
    this.update();
  }

  update(): void {
    const context = this._panel.sessionContext;
    const spec = findSpec(
      context.specsManager.specs,
      context.session?.kernel?.name,
      context.kernelDisplayName
    );
    const price = this._state.instance(context.session?.kernel?.id)?.model.price_per_hour;
    const gpu = spec ? `${spec.gpuCount > 1 ? `${spec.gpuCount}× ` : ''}${spec.gpuType}` : null;
    const lowest = this._state.lowestPrice;
    const text = gpu
      ? `GPU: ${gpu}${price ? ` · ${formatPrice(price)}` : ''}`
      : `GPU${lowest === null ? '' : ` · from ${formatPrice(lowest)}`}`;
    if (this._label.textContent !== text) {
      this._label.textContent = text;
    }
    this._button.title = gpu
      ? `This notebook runs on a FlexAI ${gpu}. Choose another GPU…`
      : 'Run this notebook on a FlexAI cloud GPU: choose the GPU…';
  }

  private _label = document.createElement('span');
  private _button: HTMLButtonElement;
}

/** Adds the GPU button (and, without a status bar, the status item) to each notebook. */
class NotebookGPU implements DocumentRegistry.IWidgetExtension<NotebookPanel, INotebookModel> {
  constructor(
    private _state: ComputeState,
    private _app: JupyterFrontEnd,
    private _inToolbar: boolean
  ) {}

  createNew(panel: NotebookPanel): IDisposable {
    // "Shut Down Kernel" before the notebook's first session exists terminates no session:
    // the start it abandons must still end, and its instance be deleted.
    panel.sessionContext.statusChanged.connect((context, status) => {
      if (status === 'terminating' && context.session === null) {
        this._state.cancelStartFor(context.path);
      }
    });
    const button = new GPUButton(panel, this._state);
    panel.toolbar.insertItem(10, 'flexaiGpu', button);
    if (this._inToolbar) {
      const status = new ComputeStatus(
        this._state,
        () => panel,
        () => void this._app.commands.execute(COMMANDS.instances),
        false
      );
      status.addClass('jp-FlexAI-status-toolbar');
      panel.toolbar.insertItem(11, 'flexaiStatus', status);
    }
    return button;
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'flexai-provisioner:plugin',
  description: 'GPU picker, boot progress, running cost and instances for FlexAI kernels.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    palette: ICommandPalette | null
  ) => {
    const state = new ComputeState(app.serviceManager.events ?? null);

    const pickFor = (panel: NotebookPanel | null | undefined): boolean => {
      if (!panel) {
        return false;
      }
      app.shell.activateById(panel.id);
      void chooseGPU(panel, state);
      return true;
    };
    app.commands.addCommand(COMMANDS.chooseGPU, {
      label: 'Choose the FlexAI GPU of this notebook…',
      isEnabled: () => tracker.currentWidget !== null,
      execute: () => pickFor(tracker.currentWidget)
    });
    app.commands.addCommand(COMMANDS.instances, {
      label: 'Show FlexAI GPU instances',
      execute: () => showInstances(state)
    });
    palette?.addItem({ command: COMMANDS.chooseGPU, category: 'FlexAI' });
    palette?.addItem({ command: COMMANDS.instances, category: 'FlexAI' });

    app.docRegistry.addWidgetExtension('Notebook', new NotebookGPU(state, app, !statusBar));

    if (statusBar) {
      const status = new ComputeStatus(
        state,
        () => tracker.currentWidget,
        () => void app.commands.execute(COMMANDS.instances)
      );
      tracker.currentChanged.connect(() => status.update());
      statusBar.registerStatusItem('flexai-provisioner:status', {
        item: status,
        align: 'left',
        rank: 5,
        isActive: () => tracker.currentWidget !== null
      });
    }

    notifyAbout(
      state,
      path => pickFor(tracker.find(panel => panel.sessionContext.path === path)),
      () =>
        new Set(
          flexaiSpecs(app.serviceManager.kernelspecs.specs).map(spec =>
            spec.gpuType.toLowerCase()
          )
        )
    );
  }
};

export default plugin;
