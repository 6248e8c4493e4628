{{/* The chart's name, or nameOverride. */}}
{{- define "csi-dmthin.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The name of the release's objects: fullnameOverride, else the release
name, or "<release>-<name>" when the release name does not hold the name. */}}
{{- define "csi-dmthin.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "csi-dmthin.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels: stable across upgrades. */}}
{{- define "csi-dmthin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "csi-dmthin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "csi-dmthin.labels" -}}
{{ include "csi-dmthin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.customLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* An image reference from {registry, repository, tag}; global.imageRegistry
replaces the registry. Call with (dict "image" ... "root" $ "defaultTag" ...). */}}
{{- define "csi-dmthin.image" -}}
{{- $registry := .root.Values.global.imageRegistry | default .image.registry -}}
{{- $tag := .image.tag | default .defaultTag -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The directory kubelet finds the driver's socket in. */}}
{{- define "csi-dmthin.socketDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName -}}
{{- end -}}

{{- define "csi-dmthin.kubeletDir" -}}
{{- trimSuffix "/" .Values.kubeletDir -}}
{{- end -}}

{{/* The helm test pods' image: test.image's fields, each defaulting to the
driver image's. */}}
{{- define "csi-dmthin.testImage" -}}
{{- $i := dict "registry" (.Values.test.image.registry | default .Values.image.registry) "repository" (.Values.test.image.repository | default .Values.image.repository) "tag" (.Values.test.image.tag | default .Values.image.tag) -}}
{{- include "csi-dmthin.image" (dict "image" $i "root" . "defaultTag" .Chart.AppVersion) -}}
{{- end -}}

{{/* The helm test pods' spec, Pod Security "restricted": they need nothing
more. Call with (dict "root" $ "image" ... "mode" write|verify "claim" ...). */}}
{{- define "csi-dmthin.testPodSpec" -}}
restartPolicy: Never
securityContext:
  runAsNonRoot: true
  runAsUser: 65534
  runAsGroup: 65534
  fsGroup: 65534
  seccompProfile:
    type: RuntimeDefault
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: selftest
    image: {{ .image }}
    imagePullPolicy: {{ .root.Values.test.image.pullPolicy }}
    args: [selftest, {{ .mode }}, /data]
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities:
        drop: [ALL]
    resources:
      requests: {cpu: 10m, memory: 16Mi}
    volumeMounts:
      - name: data
        mountPath: /data
volumes:
  - name: data
    persistentVolumeClaim:
      claimName: {{ .claim }}
{{- end }}
