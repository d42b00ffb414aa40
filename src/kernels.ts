/**
 * Which kernelspecs run on FlexAI, and on what: read from each spec's
 * `metadata.kernel_provisioner` (what `jupyter flexai install` writes).
 */
import type { KernelSpec } from '@jupyterlab/services';

const PROVISIONER = 'flexai-provisioner';

/** A FlexAI kernelspec: its name and the GPUs it runs on. */
export interface IFlexAISpec {
  name: string;
  displayName: string;
  gpuType: string;
  gpuCount: number;
}

/** The GPUs a kernelspec runs on, or null if it is not a FlexAI kernelspec. */
export function flexaiSpec(spec: KernelSpec.ISpecModel | undefined): IFlexAISpec | null {
  const provisioner = (spec?.metadata as any)?.kernel_provisioner;
  const gpuType = provisioner?.config?.gpu_type;
  if (!spec || provisioner?.provisioner_name !== PROVISIONER || typeof gpuType !== 'string') {
    return null;
  }
  const count = Number(provisioner.config.gpu_count ?? 1);
  return {
    name: spec.name,
    displayName: spec.display_name,
    gpuType,
    gpuCount: Number.isInteger(count) && count > 0 ? count : 1
  };
}

/** Every installed FlexAI kernelspec. */
export function flexaiSpecs(specs: KernelSpec.ISpecModels | null): IFlexAISpec[] {
  return Object.values(specs?.kernelspecs ?? {})
    .map(spec => flexaiSpec(spec))
    .filter((spec): spec is IFlexAISpec => spec !== null)
    .sort((a, b) => a.gpuCount - b.gpuCount || a.name.localeCompare(b.name));
}

/** The FlexAI kernelspec by name, or by the display name a pending kernel change shows. */
export function findSpec(
  specs: KernelSpec.ISpecModels | null,
  name: string | undefined,
  displayName?: string
): IFlexAISpec | null {
  const all = flexaiSpecs(specs);
  return (
    all.find(spec => spec.name === name) ??
    (displayName ? all.find(spec => spec.displayName === displayName) : undefined) ??
    null
  );
}
