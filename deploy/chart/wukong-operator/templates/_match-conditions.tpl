{{/*
The guard's matchConditions, one list for both webhooks (templates/guard.yaml). operator/tests/match_conditions.rs
evaluates them, as rendered into deploy/guard.yaml, against AdmissionReviews recorded from a genuine API server.
*/}}
{{- define "wukong.matchConditions" -}}
# (a) Only a change to a volume or a disk can unplug: a volume gone, or its disk gone, or a volume whose source
# changed (another claimName is an unplug of the old claim). The whole lists are compared, so any change to
# either reaches the webhook, additions and reorderings too (the guard allows those itself). One condition
# per kind; each is true for the other kind.
- name: vm-changes-volumes-or-disks
  expression: >-
    request.kind.kind != 'VirtualMachine' ||
    (has(oldObject.spec) && has(oldObject.spec.template) && has(oldObject.spec.template.spec) &&
      has(oldObject.spec.template.spec.volumes) ? oldObject.spec.template.spec.volumes : []) !=
    (has(object.spec) && has(object.spec.template) && has(object.spec.template.spec) &&
      has(object.spec.template.spec.volumes) ? object.spec.template.spec.volumes : []) ||
    (has(oldObject.spec) && has(oldObject.spec.template) && has(oldObject.spec.template.spec) &&
      has(oldObject.spec.template.spec.domain) && has(oldObject.spec.template.spec.domain.devices) &&
      has(oldObject.spec.template.spec.domain.devices.disks)
      ? oldObject.spec.template.spec.domain.devices.disks : []) !=
    (has(object.spec) && has(object.spec.template) && has(object.spec.template.spec) &&
      has(object.spec.template.spec.domain) && has(object.spec.template.spec.domain.devices) &&
      has(object.spec.template.spec.domain.devices.disks)
      ? object.spec.template.spec.domain.devices.disks : [])
- name: vmi-changes-volumes-or-disks
  expression: >-
    request.kind.kind != 'VirtualMachineInstance' ||
    (has(oldObject.spec) && has(oldObject.spec.volumes) ? oldObject.spec.volumes : []) !=
    (has(object.spec) && has(object.spec.volumes) ? object.spec.volumes : []) ||
    (has(oldObject.spec) && has(oldObject.spec.domain) && has(oldObject.spec.domain.devices) &&
      has(oldObject.spec.domain.devices.disks) ? oldObject.spec.domain.devices.disks : []) !=
    (has(object.spec) && has(object.spec.domain) && has(object.spec.domain.devices) &&
      has(object.spec.domain.devices.disks) ? object.spec.domain.devices.disks : [])
# (b) Not virt-handler, KubeVirt's per-node status writer: it never changes a volume or a disk (so (a) already
# spares its writes; this keeps them away even if a KubeVirt release touched a disk's defaults). virt-api
# (kubevirt-apiserver) and virt-controller (kubevirt-controller) are NOT exempt: they write the spec changes
# that are unplugs (removevolume, declarative hot-plug). The username holds KubeVirt's namespace, `kubevirt` in
# the upstream install; edit it where KubeVirt lives elsewhere (e.g. openshift-cnv, harvester-system), or
# virt-handler's writes are merely left to (a). Whoever holds virt-handler's token (every node has it) could
# unplug unguarded: the guard stops mistakes, not a compromised node.
- name: not-virt-handler
  expression: >-
    !has(request.userInfo.username) ||
    request.userInfo.username != 'system:serviceaccount:kubevirt:kubevirt-handler'
{{- end -}}
