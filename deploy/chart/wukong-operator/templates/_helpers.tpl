{{/*
The image reference: repository@digest when a digest is set (immutable), else repository:tag (tag defaults to the
chart's appVersion).
*/}}
{{- define "wukong.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/*
The Pods' labels and the selector of the Deployment, PodDisruptionBudget, NetworkPolicy and Services. Only the name:
a selector cannot change after the install, and the operator is one per cluster (see values.yaml).
*/}}
{{- define "wukong.selectorLabels" -}}
app.kubernetes.io/name: wukong-operator
{{- end -}}

{{/*
The webhook Service's DNS name, which the serving certificate must carry.
*/}}
{{- define "wukong.guardServiceHost" -}}
wukong-guard.{{ .Release.Namespace }}.svc
{{- end -}}

{{/*
The webhooks' caBundle field, by guard.certificates:
  secret       the guard.caBundle value, rendered even when empty (a caBundle filled in later, as the README's
               kubectl route did);
  certManager  no field at all: cert-manager's cainjector owns it, and a rendered empty value would make every
               server-side apply (helm, Argo CD, Flux) take it back from the injector;
  operator     no field either, for the same reason: the operator's leader keeps it equal to its CA bundle.
*/}}
{{- define "wukong.guardCaBundle" -}}
{{- if eq .Values.guard.certificates "secret" -}}
caBundle: {{ .Values.guard.caBundle | quote }}
{{- end -}}
{{- end -}}

{{/*
A webhook's selector: the guard's own (the argument "own", a dict) with the user's guard.namespaceSelector or
guard.objectSelector (the argument "extra") added: matchLabels merged (the guard's own label wins), matchExpressions
appended.
*/}}
{{- define "wukong.selector" -}}
{{- $labels := merge (deepCopy (.own.matchLabels | default dict)) (.extra.matchLabels | default dict) -}}
{{- $expressions := concat (.own.matchExpressions | default list) (.extra.matchExpressions | default list) -}}
{{- $selector := dict -}}
{{- if $labels }}{{ $_ := set $selector "matchLabels" $labels }}{{ end -}}
{{- if $expressions }}{{ $_ := set $selector "matchExpressions" $expressions }}{{ end -}}
{{- toYaml $selector -}}
{{- end -}}


{{/*
What the operator does in the namespaces it watches: the rules of its ClusterRole, or of its Role in the watched
namespace (watchNamespace).
*/}}
{{- define "wukong.namespacedRules" -}}
# The Wukong objects: watched, a finalizer added and removed, status written.
- apiGroups: ["vm.novasphere.dev"]
  resources: ["wukongs"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["vm.novasphere.dev"]
  resources: ["wukongs/status"]
  verbs: ["get", "patch", "update"]
# Owner references with blockOwnerDeletion on the claims need update on the owner's finalizers.
- apiGroups: ["vm.novasphere.dev"]
  resources: ["wukongs/finalizers"]
  verbs: ["update"]
# The disks' claims: created by server-side apply, deleted after a detach unless preserveData.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The disks' DataVolumes (CDI), when a disk is imported or cloned: made and removed as their claims are.
- apiGroups: ["cdi.kubevirt.io"]
  resources: ["datavolumes"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The snapshots taken before a detach (detachOptions.snapshot): made, read until ready, and deleted only when one of
# an earlier release of the disk must be taken again. Read by name: no list or watch.
- apiGroups: ["snapshot.storage.k8s.io"]
  resources: ["volumesnapshots"]
  verbs: ["get", "create", "delete"]
# The VMs and their VMIs: read only; changes go through KubeVirt's hot-plug subresources.
- apiGroups: ["kubevirt.io"]
  resources: ["virtualmachines", "virtualmachineinstances"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["subresources.kubevirt.io"]
  resources:
    - virtualmachines/addvolume
    - virtualmachines/removevolume
    - virtualmachineinstances/addvolume
    - virtualmachineinstances/removevolume
  verbs: ["update"]
# The way to the agents of VMIs with a vsock CID: KubeVirt's vsock subresource (no KubeVirt role grants it).
- apiGroups: ["subresources.kubevirt.io"]
  resources: ["virtualmachineinstances/vsock"]
  verbs: ["get"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/*
The cluster-scoped reads that make the operator's checks complete, read-only: in its ClusterRole, or with
watchNamespace in the optional ClusterRole wukong-operator-cluster-reads (clusterReads).
*/}}
{{- define "wukong.clusterReadRules" -}}
# Which StorageClasses exist, which is the default, and which bind only for a first consumer (read while a claim is
# not bound yet).
- apiGroups: ["storage.k8s.io"]
  resources: ["storageclasses"]
  verbs: ["get", "list"]
# CDI's StorageProfiles: a DataVolume's access and volume modes for its StorageClass.
- apiGroups: ["cdi.kubevirt.io"]
  resources: ["storageprofiles"]
  verbs: ["get"]
# The cluster's hot-plug mode (feature gates of the KubeVirt object, in KubeVirt's namespace).
- apiGroups: ["kubevirt.io"]
  resources: ["kubevirts"]
  verbs: ["list"]
{{- end -}}
