/**
 * The GPU dialog: the platform's GPU types with memory, price and free count, a GPU count
 * with the total price, and switching the notebook's kernel to the chosen kernelspec (so the
 * choice is kept in the notebook's `metadata.kernelspec`). When the server cannot reach
 * FlexAI, it says what is wrong and how to fix it instead.
 */
import { Dialog, showDialog } from '@jupyterlab/apputils';
import type { NotebookPanel } from '@jupyterlab/notebook';
import { Widget } from '@lumino/widgets';

import { compute, type IGPUType, type IHealth } from './api';
import { failureOf, formatPrice } from './format';
import { findSpec, flexaiSpecs, type IFlexAISpec } from './kernels';
import { problemWidget } from './problem';
import type { ComputeState } from './state';

/** One row of the picker: a GPU type and the kernelspecs that run on it. */
interface IChoice {
  type: IGPUType;
  specs: IFlexAISpec[];
}

/** Open the GPU dialog for `panel`; switch its kernel if the person chooses a GPU. */
export async function chooseGPU(panel: NotebookPanel, state: ComputeState): Promise<void> {
  const specsManager = panel.sessionContext.specsManager;
  let body: Widget;
  let choose: PickerBody | null = null;
  try {
    const [health, types] = await Promise.all([
      compute<IHealth>('health'),
      state.gpuTypes().catch(() => [] as IGPUType[]),
      specsManager.ready
    ]);
    if (!health.ok) {
      body = unhealthy(health);
    } else {
      const specs = flexaiSpecs(specsManager.specs);
      const current = findSpec(
        specsManager.specs,
        panel.sessionContext.session?.kernel?.name,
        panel.sessionContext.kernelDisplayName
      );
      choose = new PickerBody(
        types.map(type => ({
          type,
          specs: specs.filter(spec => spec.gpuType.toLowerCase() === type.name.toLowerCase())
        })),
        current
      );
      body = choose;
    }
  } catch (error) {
    body = problemWidget({
      title: 'The GPU list could not be loaded',
      message: (error as Error).message
    });
  }
  const result = await showDialog<string | null>({
    title: 'Choose a GPU for this notebook',
    body,
    buttons: choose
      ? [Dialog.cancelButton(), Dialog.okButton({ label: 'Switch kernel' })]
      : [Dialog.okButton({ label: 'Close' })],
    hasClose: true
  });
  const kernelName = result.button.accept ? result.value : null;
  if (!choose || !kernelName) {
    return;
  }
  // The boot takes a while: the status item shows its progress, JupyterLab any error.
  panel.sessionContext.changeKernel({ name: kernelName }).catch(error => {
    console.warn('FlexAI: the kernel change failed:', error);
  });
}

function unhealthy(health: IHealth): Widget {
  const detail = health.platform.message ?? 'the FlexAI platform did not answer';
  const { fix } = failureOf(detail);
  return problemWidget({
    title: 'This Jupyter server cannot reach FlexAI, so no GPU can start',
    fix: `${fix} Fix it where the Jupyter server runs, restart the server, then open this dialog again.`,
    message: detail
  });
}

/** The picker's body; its value is the chosen kernelspec's name. */
class PickerBody extends Widget implements Dialog.IBodyWidget<string | null> {
  constructor(choices: IChoice[], current: IFlexAISpec | null) {
    super();
    this.addClass('jp-FlexAI-picker');
    this._choices = choices;
    const usable = choices.filter(c => c.specs.length && c.type.available > 0);
    const currentChoice = current
      ? choices.find(c => c.type.name.toLowerCase() === current.gpuType.toLowerCase())
      : undefined;
    this._selected =
      (currentChoice && usable.includes(currentChoice) ? currentChoice : usable[0]) ?? null;
    this._count = current?.gpuCount ?? 1;
    this._render(current);
  }

  getValue(): string | null {
    return this._spec()?.name ?? null;
  }

  protected onAfterAttach(): void {
    this._update();
  }

  private _spec(): IFlexAISpec | null {
    const specs = this._selected?.specs ?? [];
    return specs.find(spec => spec.gpuCount === this._count) ?? specs[0] ?? null;
  }

  private _render(current: IFlexAISpec | null): void {
    const node = this.node;
    const intro = node.appendChild(document.createElement('p'));
    intro.className = 'jp-FlexAI-intro';
    intro.textContent = current
      ? `This notebook runs on ${current.displayName}. A new GPU starts a new kernel: ` +
        'variables in memory are lost, the notebook is kept.'
      : 'The kernel runs on a FlexAI cloud GPU, billed per hour from its start until the ' +
        'kernel shuts down.';

    const table = node.appendChild(document.createElement('table'));
    table.className = 'jp-FlexAI-gpuTable';
    const head = table.createTHead().insertRow();
    for (const label of ['', 'GPU', 'Memory', 'Price', 'Free now']) {
      const cell = head.appendChild(document.createElement('th'));
      cell.textContent = label;
    }
    const body = table.createTBody();
    if (!this._choices.length) {
      const cell = body.insertRow().insertCell();
      cell.colSpan = 5;
      cell.textContent = 'The platform offers no GPU type.';
    }
    for (const choice of this._choices) {
      const { type } = choice;
      const row = body.insertRow();
      row.className = 'jp-FlexAI-gpuRow';
      row.dataset.gpu = type.name;
      const why = !choice.specs.length
        ? `No kernelspec runs on ${type.name} here: add one with ` +
          `\`jupyter flexai install --gpu ${type.name}\` on the server.`
        : type.available <= 0
          ? `No ${type.name} is free right now.`
          : '';
      const radio = document.createElement('input');
      radio.type = 'radio';
      radio.name = 'jp-FlexAI-gpu';
      radio.disabled = Boolean(why);
      radio.checked = choice === this._selected;
      radio.setAttribute('aria-label', type.name);
      row.insertCell().appendChild(radio);
      row.insertCell().textContent = type.name;
      row.insertCell().textContent = `${type.memory_gb} GB`;
      row.insertCell().textContent = formatPrice(type.price_per_hour);
      row.insertCell().textContent = !choice.specs.length
        ? 'not installed'
        : type.available > 0
          ? `${type.available}`
          : 'none';
      if (why) {
        row.classList.add('jp-mod-disabled');
        row.title = why;
      } else {
        row.addEventListener('click', () => {
          radio.checked = true;
          this._selected = choice;
          this._update();
        });
      }
      this._rows.set(choice, row);
    }

    const footer = node.appendChild(document.createElement('div'));
    footer.className = 'jp-FlexAI-countRow';
    const label = footer.appendChild(document.createElement('label'));
    label.textContent = 'GPUs per kernel ';
    this._countSelect.className = 'jp-mod-styled';
    this._countSelect.addEventListener('change', () => {
      this._count = Number(this._countSelect.value);
      this._update();
    });
    label.appendChild(this._countSelect);
    this._total.className = 'jp-FlexAI-total';
    footer.appendChild(this._total);
    this._hint.className = 'jp-FlexAI-hint';
    node.appendChild(this._hint);
    this._update();
  }

  private _update(): void {
    for (const [choice, row] of this._rows) {
      row.classList.toggle('jp-mod-selected', choice === this._selected);
    }
    const counts = (this._selected?.specs ?? []).map(spec => spec.gpuCount);
    if (!counts.includes(this._count)) {
      this._count = counts[0] ?? 1;
    }
    this._countSelect.replaceChildren(
      ...(counts.length ? counts : [1]).map(count => new Option(`${count}`, `${count}`))
    );
    this._countSelect.value = `${this._count}`;
    this._countSelect.disabled = counts.length < 2;
    const type = this._selected?.type;
    const accept = this.node
      .closest('.jp-Dialog')
      ?.querySelector<HTMLButtonElement>('.jp-Dialog-button.jp-mod-accept');
    if (accept) {
      accept.disabled = !this._spec();
      const label = accept.querySelector('.jp-Dialog-buttonLabel') ?? accept;
      label.textContent = type ? `Switch to ${this._spec()?.displayName ?? type.name}` : 'Switch';
    }
    this._total.textContent = type
      ? `Total ${formatPrice(type.price_per_hour * this._count)}`
      : 'No GPU type can start now';
    this._hint.textContent =
      type && counts.length < 2
        ? `More ${type.name}s per kernel need a kernelspec of their own, with "gpu_count" ` +
          'in its metadata.kernel_provisioner.config.'
        : '';
  }

  private _choices: IChoice[];
  private _selected: IChoice | null;
  private _count: number;
  private _rows = new Map<IChoice, HTMLTableRowElement>();
  private _countSelect = document.createElement('select');
  private _total = document.createElement('span');
  private _hint = document.createElement('p');
}
