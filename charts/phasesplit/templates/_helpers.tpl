{{- define "phasesplit.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "phasesplit.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
phasesplit.io/role: operator
{{- end -}}

{{- define "phasesplit.labels" -}}
{{ include "phasesplit.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: phasesplit
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "phasesplit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "phasesplit.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Contradictions the schema cannot express. */}}
{{- define "phasesplit.validateValues" -}}
{{- if and (gt (int .Values.operator.replicas) 1) (eq .Values.operator.peeringName "") -}}
{{- fail "operator.peeringName: needed when operator.replicas > 1 (peering keeps one replica active)" -}}
{{- end -}}
{{- if and .Values.rbac.clusterWide .Values.operator.watchNamespaces -}}
{{- fail "operator.watchNamespaces: leave it empty with rbac.clusterWide (the operator then watches every namespace)" -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator watches (a JSON list): none with rbac.clusterWide (all of them),
else operator.watchNamespaces, else the release's namespace. */}}
{{- define "phasesplit.watchNamespaces" -}}
{{- if .Values.rbac.clusterWide -}}
[]
{{- else -}}
{{- .Values.operator.watchNamespaces | default (list .Release.Namespace) | toJson -}}
{{- end -}}
{{- end -}}

{{/* The operator's image: by digest when one is given, else by tag. */}}
{{- define "phasesplit.image" -}}
{{- $image := .Values.operator.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository ($image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}
